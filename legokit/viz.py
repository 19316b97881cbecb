"""Every plot the notebooks show (matplotlib / seaborn). Each function takes data, returns a Figure.

Sections by notebook; nothing in the core modules imports this file.
"""

from __future__ import annotations

import matplotlib

matplotlib.use(matplotlib.get_backend())  # keep the caller's backend (inline in Jupyter, Agg headless)

# ===================================================================== pruning (01_pruning)

# ===================================================================== clients (02_clients)

# ===================================================================== aggregation (03_aggregation)

# ===================================================================== experiment (04_lego_experiment, 00_tour)
