"""Every plot the notebooks show (matplotlib / seaborn). Each function takes data and returns a Figure.

One module per topic: ``pruning`` (01_pruning), ``clients`` (02_clients), ``aggregation`` and ``privacy``
(03_aggregation), ``experiment`` (04_lego_experiment, 00_tour), ``studio`` (05_studio), ``sweeps``
(``legokit sweep``'s ``summary.png``), ``audit`` (``legokit audit``'s ROC curves); ``figure`` makes every Figure.
Every ``plot_*`` is importable from here (``from legokit import viz; viz.plot_mask(...)``). Nothing in the core
modules imports this package.
"""

from legokit.viz.aggregation import (
    plot_aggregation_errors,
    plot_aggregator_detail,
    plot_aggregator_scores,
    plot_cosine_matrix,
    plot_coverage_map,
    plot_energy_by_rank,
    plot_layer_coverage,
    plot_update_norms,
)
from legokit.viz.audit import plot_roc_curves
from legokit.viz.clients import (
    plot_budget_fit,
    plot_client_population,
    plot_client_scores,
    plot_task_mix,
    plot_training_curves,
)
from legokit.viz.experiment import (
    plot_aggregate_vs_client,
    plot_before_after,
    plot_block_scores,
    plot_condition_scores,
    plot_delta_images,
    plot_energy_kept,
    plot_layer_sparsity,
    plot_mask,
)
from legokit.viz.privacy import plot_exposure
from legokit.viz.pruning import (
    plot_mask_nesting,
    plot_nm_groups,
    plot_reconstruction_errors,
    plot_score_distributions,
    plot_structured_kept,
)
from legokit.viz.studio import plot_compare, plot_losses, plot_run_coverage
from legokit.viz.sweeps import plot_sweep_summary

__all__ = [
    "plot_aggregate_vs_client",
    "plot_aggregation_errors",
    "plot_aggregator_detail",
    "plot_aggregator_scores",
    "plot_before_after",
    "plot_block_scores",
    "plot_budget_fit",
    "plot_client_population",
    "plot_client_scores",
    "plot_compare",
    "plot_condition_scores",
    "plot_cosine_matrix",
    "plot_coverage_map",
    "plot_delta_images",
    "plot_energy_by_rank",
    "plot_energy_kept",
    "plot_exposure",
    "plot_layer_coverage",
    "plot_layer_sparsity",
    "plot_losses",
    "plot_mask",
    "plot_mask_nesting",
    "plot_nm_groups",
    "plot_reconstruction_errors",
    "plot_roc_curves",
    "plot_run_coverage",
    "plot_score_distributions",
    "plot_structured_kept",
    "plot_sweep_summary",
    "plot_task_mix",
    "plot_training_curves",
    "plot_update_norms",
]
