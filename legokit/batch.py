"""Compatibility: the old home of ``legokit sweep`` / ``legokit report``, split into one module per concept.

Import from the new homes; this module only re-exports their public names so old imports keep working:

- :mod:`legokit.grid`: the grid file format; ``SweepPoint``, ``load_grid``, ``expand_points``, ``grid_hash``,
  ``notebook_parameters``, ``validate_points``.
- :mod:`legokit.sweep`: claiming the output directory, running the points with papermill, resume, failures;
  ``SweepResult``, ``sweep``, ``run_point``, ``summary_figure`` (writes summary.png).
- :mod:`legokit.collect`: reading sweep and run directories back; ``flatten``, ``point_status``, ``collect``,
  ``report`` (the generic report: a run directory's results.json is printed flat).
- :mod:`legokit.viz`: ``plot_sweep_summary``, the figure behind summary.png.
- :mod:`legokit.cli`: the ``sweep`` and ``report`` commands (``add_sweep_commands``, re-exported here as
  ``add_commands``); ``legokit report`` prints a LEGO run with ``experiment.results_table``.
"""

from legokit.cli import add_sweep_commands as add_commands
from legokit.collect import collect, flatten, point_status, report
from legokit.grid import SweepPoint, expand_points, grid_hash, load_grid, notebook_parameters, validate_points
from legokit.sweep import SweepResult, run_point, summary_figure, sweep

__all__ = ["SweepPoint", "SweepResult", "add_commands", "collect", "expand_points", "flatten", "grid_hash",
           "load_grid", "notebook_parameters", "point_status", "report", "run_point", "summary_figure", "sweep",
           "validate_points"]
