"""Analysis helpers behind the pruning (01), client (02) and aggregation (03) notebooks, by topic.

- ``analysis.pruning``: what calibration saw, each method's scores and nested masks, what a block costs each
  module's output, statistics of masks.
- ``analysis.clients``: what each device holds and costs, which block a budget buys, what a client trains on,
  how its training went and how its block scores before and after the federation.
- ``analysis.aggregation``: every aggregator replayed on the same client updates, its error against the
  owner mean, the energy a rank-r broadcast keeps, and an update applied to a model and restored.

Every public name is re-exported here, so notebooks call ``analysis.<name>`` whatever its topic.
"""

from legokit.analysis.aggregation import (
    AggregatedDeltas,
    LazyDeltas,
    aggregation_errors,
    aggregator_detail,
    apply_delta,
    block_update,
    client_masks,
    client_updates,
    coverage_table,
    energy_by_rank,
    owner_mean,
    reaggregate,
    update_norm_table,
)
from legokit.analysis.clients import (
    block_cost_table,
    block_costs,
    blocks_for_budgets,
    client_rounds,
    client_scores,
    client_table,
    main_task,
    read_metrics,
    response_nll,
    task_mix,
)
from legokit.analysis.pruning import (
    CalibrationStats,
    calibration_stats,
    kept_overlap,
    mask_stats,
    module_masks,
    module_scores,
    reconstruction_errors,
    score_sample,
    structured_kept,
)
from legokit.models import layer_of

__all__ = [
    "AggregatedDeltas", "CalibrationStats", "LazyDeltas", "aggregation_errors", "aggregator_detail", "apply_delta",
    "block_cost_table", "block_costs", "block_update", "blocks_for_budgets", "calibration_stats", "client_masks",
    "client_rounds", "client_scores", "client_table", "client_updates", "coverage_table", "energy_by_rank",
    "kept_overlap", "layer_of", "main_task", "mask_stats", "module_masks", "module_scores", "owner_mean",
    "read_metrics", "reaggregate", "reconstruction_errors", "response_nll", "score_sample", "structured_kept",
    "task_mix", "update_norm_table",
]
