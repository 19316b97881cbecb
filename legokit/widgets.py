"""ipywidgets explorers for JupyterLab. Each function returns a widget; it only calls legokit and viz.

Sections by notebook; nothing in the core modules imports this file.
"""

from __future__ import annotations

# ===================================================================== pruning (01_pruning)

# ===================================================================== clients (02_clients)

# ===================================================================== aggregation (03_aggregation)
