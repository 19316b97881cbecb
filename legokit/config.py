"""Typed experiment configuration: dataclasses that validate themselves, YAML in and out.

An ``ExperimentConfig`` holds one section per stage (prune, lora, train, fed, data, eval, privacy). Every
value is checked in ``__post_init__`` so a bad config fails before any model is loaded, and an
unknown key names the closest valid one.

Sizes live in YAML files, never in notebooks: ``configs/<profile>.yaml`` (``quick``, ``full``) for the
library and the CLI, and ``configs/notebooks/<notebook>-<profile>.yaml`` for a notebook that needs other
sizes (``notebook_config`` picks one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from legokit.names import (
    AGGREGATOR_NAMES,
    BROADCAST_MODES,
    CALIBRATION_MODES,
    CHOICE_TASK_NAMES,
    DEFAULT_MODEL,
    DEVICE_PROFILES,
    EVAL_ITEMS,
    FORMAT_OF_SCORING,
    LORA_TARGETS,
    METHODS,
    NM_PATTERN,
    PARTITIONS,
    PATTERN_KINDS,
    REFERENCE_MODES,
    SCORINGS,
    TASK_NAMES,
    TRAIN_FORMATS,
    UNCOVERED_RULES,
    WEIGHTINGS,
)
from legokit.privacy.settings import PrivacyConfig, check_privacy
from legokit.utils import LegokitError, read_yaml_mapping

# The allowed names (methods, patterns, tasks, aggregators, ...) are legokit.names's: one owner, shared with the
# modules that implement them. ``legokit.config.DEVICE_PROFILES`` and the others stay importable from here.


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise LegokitError(msg)


def _finite(x: Any) -> bool:
    # NaN fails every comparison and inf passes "> 0": both would reach the optimizer silently
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_sparsity(s: float, what: str = "sparsity") -> None:
    """Sparsity is the pruned fraction: a number in [0, 1)."""
    _check(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1,
           f"{what}={s!r} is not in [0, 1): use e.g. 0.5 for 50% of the weights pruned")


def _pattern_ok(pattern: str) -> bool:
    if pattern in PATTERN_KINDS:
        return True
    m = re.fullmatch(NM_PATTERN, pattern)
    return bool(m) and 0 < int(m.group(1)) < int(m.group(2))


@dataclass
class PruneConfig:
    """How the building blocks are extracted from the LLM."""

    method: str = "wanda"
    pattern: str = "unstructured"  # unstructured | N:M (e.g. "2:4": 2 of every 4 zero) | structured
    calibration: str = "one_shot"  # one_shot | sequential
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    n_calib: int = 32
    seq_len: int = 256

    def __post_init__(self):
        _check(self.method in METHODS, f"prune.method={self.method!r} is unknown: use one of {METHODS}")
        _check(_pattern_ok(self.pattern),
               f"prune.pattern={self.pattern!r} is invalid: use 'unstructured', 'structured' or 'N:M' with N < M")
        _check(self.calibration in CALIBRATION_MODES,
               f"prune.calibration={self.calibration!r} is unknown: use one of {CALIBRATION_MODES}")
        _check(len(self.sparsities) > 0, "prune.sparsities is empty: list at least one level, e.g. [0.0, 0.5]")
        for s in self.sparsities:
            check_sparsity(s, "prune.sparsities entry")
        _check(len(set(self.sparsities)) == len(self.sparsities),
               f"prune.sparsities={self.sparsities} repeats a level: list each once (one block per level)")
        _check(self.n_calib >= 1, f"prune.n_calib={self.n_calib} must be >= 1 (calibration needs text)")
        _check(self.seq_len >= 8, f"prune.seq_len={self.seq_len} must be >= 8")
        _check(not (self.method == "sparsegpt" and self.pattern == "structured"),
               "prune.method='sparsegpt' reconstructs unstructured or N:M masks, not prune.pattern='structured': "
               "use method 'wanda' or 'magnitude' for structured blocks, or an unstructured / N:M pattern")
        m = re.fullmatch(NM_PATTERN, self.pattern)
        if m:  # an N:M pattern prunes exactly N/M of the weights: the only levels it has are 0 and N/M
            n, mm = int(m.group(1)), int(m.group(2))
            bad = [s for s in self.sparsities if s != 0 and abs(s - n / mm) > 1e-9]
            _check(not bad, f"prune.sparsities has {bad}, which prune.pattern={self.pattern!r} cannot give: it prunes "
                            f"{n} of every {mm} weights (sparsity {n / mm:g}); use prune.sparsities "
                            f"[0.0, {n / mm:g}] or an unstructured pattern")


@dataclass
class LoraConfig:
    """The LoRA adapter each client trains (peft's meaning of rank, alpha, dropout)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    mask_in_training: bool = True  # effective weight W_k + M_k ⊙ (s·BA): the block stays as sparse

    def __post_init__(self):
        _check(isinstance(self.rank, int) and self.rank >= 1, f"lora.rank={self.rank!r} must be an int >= 1")
        _check(_finite(self.alpha) and self.alpha > 0, f"lora.alpha={self.alpha!r} must be a finite number > 0")
        _check(0 <= self.dropout < 1, f"lora.dropout={self.dropout!r} must be in [0, 1)")
        bad = [t for t in self.target_modules if t not in LORA_TARGETS]
        _check(not bad and self.target_modules,
               f"lora.target_modules has {bad or 'nothing'}: use names from {LORA_TARGETS}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class TrainConfig:
    """One client's local training per round."""

    local_steps: int = 10
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 256
    # Recompute each decoder layer's activations in the backward pass instead of keeping them: the
    # activations are the largest term of a client's training memory (measured on the quick profile:
    # peak RSS 3.4 -> 2.5 GiB, federation time +27%); the trained factors are the same.
    gradient_checkpointing: bool = False
    # How choice tasks are trained (names.TRAIN_FORMATS): in the form eval.scoring reads them (harness: cloze,
    # label: chat), so what a client learns reaches its score. Generative tasks train on their chat prompt.
    format: str = "cloze"

    def __post_init__(self):
        _check(self.format in TRAIN_FORMATS, f"train.format={self.format!r} is unknown: use one of "
               f"{list(TRAIN_FORMATS)} ({'; '.join(f'{k}: {v}' for k, v in TRAIN_FORMATS.items())})")
        _check(self.local_steps >= 1, f"train.local_steps={self.local_steps} must be >= 1")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _check(_finite(self.lr) and self.lr > 0, f"train.lr={self.lr} must be a finite number > 0, e.g. 3e-4")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0,
               f"train.weight_decay={self.weight_decay} must be a finite number >= 0 (0 for none, e.g. 0.01)")
        _check(_finite(self.max_grad_norm) and self.max_grad_norm > 0,
               f"train.max_grad_norm={self.max_grad_norm} must be a finite number > 0 (e.g. 1.0; a large value such "
               "as 1e6 clips practically never)")
        _check(self.max_len >= 16, f"train.max_len={self.max_len} must be >= 16")


def first_difference(a: Any, b: Any, prefix: str = "") -> str:
    """Where two config dicts first differ, e.g. ``"fed.rounds: 2 there, 3 here"`` (``"identical"`` if nowhere)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
        return "identical"
    return f"{prefix.rstrip('.')}: {a!r} there, {b!r} here"


def sampled_count(fraction: float, clients: int) -> int:
    """How many of ``clients`` a round samples: ``fraction * clients`` rounded half up (0.5 -> 1, 2.5 -> 3)."""
    return math.floor(fraction * clients + 0.5)


@dataclass
class FedConfig:
    """The federation: clients, rounds, aggregation and broadcast."""

    num_clients: int = 4
    rounds: int = 2
    sample_fraction: float = 1.0
    aggregator: str = "heteagg"  # an aggregate.AGGREGATORS name, or a reference mode: local | centralized
    broadcast: str = "adapter"  # adapter (SVD to global_rank) | merge (fold into the LLM and every block)
    global_rank: int | None = None  # None: the sum of the client ranks, capped by each matrix
    uncovered: str = "keep"
    weighting: str = "samples"
    # Which block each client holds: explicit sparsities per client, else device profiles.
    client_sparsities: list[float] | None = None
    devices: list[str] | None = None

    def __post_init__(self):
        _check(self.num_clients >= 1, f"fed.num_clients={self.num_clients} must be >= 1")
        _check(self.rounds >= 1, f"fed.rounds={self.rounds} must be >= 1")
        _check(0 < self.sample_fraction <= 1, f"fed.sample_fraction={self.sample_fraction} must be in (0, 1]")
        _check(self.sample_fraction <= 0 or sampled_count(self.sample_fraction, self.num_clients) >= 1,
               f"fed.sample_fraction={self.sample_fraction} of {self.num_clients} clients selects no client: use "
               f"at least {0.5 / self.num_clients:.3g} (one client per round)")
        _check(self.aggregator in AGGREGATOR_NAMES + REFERENCE_MODES,
               f"fed.aggregator={self.aggregator!r} is unknown: use one of {AGGREGATOR_NAMES + REFERENCE_MODES}")
        _check(self.broadcast in BROADCAST_MODES,
               f"fed.broadcast={self.broadcast!r} is unknown: use one of {BROADCAST_MODES}")
        _check(self.global_rank is None or self.global_rank >= 1,
               f"fed.global_rank={self.global_rank} must be >= 1 or null (sum of client ranks)")
        _check(self.uncovered in UNCOVERED_RULES,
               f"fed.uncovered={self.uncovered!r} is unknown: use one of {UNCOVERED_RULES}")
        _check(self.weighting in WEIGHTINGS, f"fed.weighting={self.weighting!r} is unknown: use one of {WEIGHTINGS}")
        if self.client_sparsities is not None:
            _check(len(self.client_sparsities) == self.num_clients,
                   f"fed.client_sparsities has {len(self.client_sparsities)} entries for "
                   f"{self.num_clients} clients: give one sparsity per client")
            for s in self.client_sparsities:
                check_sparsity(s, "fed.client_sparsities entry")
        if self.devices is not None:
            _check(len(self.devices) == self.num_clients,
                   f"fed.devices has {len(self.devices)} entries for {self.num_clients} clients: give one per client")
            bad = [d for d in self.devices if d not in DEVICE_PROFILES]
            _check(not bad, f"fed.devices has unknown profiles {bad}: use names from {sorted(DEVICE_PROFILES)}")


@dataclass
class DataConfig:
    """Which tasks the clients train on and how they are split between clients."""

    tasks: list[str] = field(default_factory=lambda: ["boolq", "commonsense_qa", "nq_open", "asdiv"])
    partition: str = "task"
    alpha: float | None = None  # Dirichlet concentration (dirichlet / quantity)
    train_examples: int = 256  # pooled training examples drawn from the tasks' train splits
    tasks_per_client: list[list[str]] | None = None
    # Subsample each choice task's training examples to equal answer counts (data.balance_labels), so that a
    # constant answer is no easy win.
    balance_labels: bool = False

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        _check(not bad and self.tasks,
               f"data.tasks has unknown tasks {bad or 'none'}: use names from {sorted(TASK_NAMES)}")
        _check(self.partition in PARTITIONS, f"data.partition={self.partition!r} is unknown: use one of {PARTITIONS}")
        _check(self.alpha is None or (_finite(self.alpha) and self.alpha > 0),
               f"data.alpha={self.alpha} must be a finite number > 0 (e.g. 0.1, 1, 10)")
        _check(self.partition != "dirichlet" or self.alpha is not None,
               "data.partition='dirichlet' needs data.alpha (e.g. 0.1 for very non-IID, 10 for near IID)")
        _check(self.train_examples >= 1, f"data.train_examples={self.train_examples} must be >= 1")


@dataclass
class EvalConfig:
    """What is measured after training."""

    tasks: list[str] | None = None  # None: every task in legokit.data.TASKS (names.TASK_NAMES)
    n: int = 20  # test items per task for the global LLMs (the models claim C1 compares)
    n_blocks: int | None = None  # test items per task for every block (None: n); C2 compares blocks
    items: str = "per_seed"  # per_seed: a seeded draw of the test split per run seed | first: the first n
    scoring: str = "harness"  # choice tasks: harness (lm-eval acc / acc_norm on option text) | label
    ppl_texts: int = 32
    seq_len: int = 256
    batch_size: int = 8
    blocks: bool = True  # also evaluate every client's updated block
    base: bool = True  # also evaluate the LLM before federated training (the zero-shot reference)
    # The learning gate (legokit.learning): every client's block scored on its own tasks before and after training,
    # on n_learning test items per task (None: n, the global LLMs' items)
    learning: bool = True
    n_learning: int | None = None

    def __post_init__(self):
        if self.tasks is not None:
            # an empty list used to read as "every task" (the None default): say which one is meant
            _check(len(self.tasks) > 0, "eval.tasks is empty: name the tasks to score, e.g. [boolq, piqa], or leave "
                                        f"it out (null) for every task {sorted(TASK_NAMES)}")
            bad = [t for t in self.tasks if t not in TASK_NAMES]
            _check(not bad, f"eval.tasks has unknown tasks {bad}: use names from {sorted(TASK_NAMES)}")
        _check(self.n >= 1, f"eval.n={self.n} must be >= 1")
        _check(self.n_learning is None or self.n_learning >= 1,
               f"eval.n_learning={self.n_learning} must be >= 1 (or null: n)")
        _check(self.n_blocks is None or self.n_blocks >= 1, f"eval.n_blocks={self.n_blocks} must be >= 1 (or null: n)")
        _check(self.items in EVAL_ITEMS, f"eval.items={self.items!r}: use {' or '.join(EVAL_ITEMS)}")
        _check(self.scoring in SCORINGS, f"eval.scoring={self.scoring!r} is unknown: use one of {list(SCORINGS)} "
               f"({'; '.join(f'{k}: {v}' for k, v in SCORINGS.items())})")
        _check(self.ppl_texts >= 1, f"eval.ppl_texts={self.ppl_texts} must be >= 1")
        _check(self.seq_len >= 8, f"eval.seq_len={self.seq_len} must be >= 8 (tokens per perplexity window, "
                                  "e.g. 256)")
        _check(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1 (e.g. 8)")


# Shipped profiles live at the repository's top level (legokit is installed editable).
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

SECTIONS = {"prune": PruneConfig, "lora": LoraConfig, "train": TrainConfig, "fed": FedConfig,
            "data": DataConfig, "eval": EvalConfig, "privacy": PrivacyConfig}


@dataclass
class ExperimentConfig:
    """A whole LEGO experiment."""

    name: str = "lego"
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    prune: PruneConfig = field(default_factory=PruneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # client-level DP (legokit.privacy); off by default
    # Sizes only a notebook reads (e.g. 03's error_layer_step); the library ignores them. Plain YAML literals,
    # so a run directory's config.yaml records them too. null reads as {}.
    notebook: dict[str, Any] | None = field(default_factory=dict)

    def __post_init__(self):
        if self.notebook is None:
            self.notebook = {}
        _check(isinstance(self.notebook, dict), f"notebook must be a mapping of names to values, got {self.notebook!r}")
        for key, value in self.notebook.items():
            _check(isinstance(key, str), f"notebook key {key!r} must be a string")
            _check(_is_literal(value), f"notebook.{key}={value!r} must be a YAML literal (number, string, bool, "
                                       "null, or a list / mapping of them)")
        for s in self.fed.client_sparsities or []:
            _check(any(abs(s - p) < 1e-9 for p in self.prune.sparsities),
                   f"fed.client_sparsities asks for {s} but prune.sparsities extracts only {self.prune.sparsities}")
        for dev in dict.fromkeys(self.fed.devices or []):  # as strategy.assign_blocks: the densest block that fits
            budget = DEVICE_PROFILES[dev]
            _check(any(1 - p <= budget + 1e-9 for p in self.prune.sparsities),
                   f"fed.devices has {dev!r} (a budget of {budget:.0%} of the LLM), but no level of prune.sparsities "
                   f"{self.prune.sparsities} fits it: add {1 - budget:.2f} (or a sparser level) to prune.sparsities")
        self._check_format()
        check_privacy(self)  # last: a target epsilon is resolved by the accountant only once the rest is valid

    def _check_format(self) -> None:
        """Choice tasks train in the form their score reads (``names.FORMAT_OF_SCORING``), or nothing learnt shows."""
        choice = [t for t in self.data.tasks if t in CHOICE_TASK_NAMES]
        want = FORMAT_OF_SCORING[self.eval.scoring]
        _check(not choice or self.train.format == want,
               f"train.format={self.train.format!r} ({TRAIN_FORMATS[self.train.format]}) cannot be scored by "
               f"eval.scoring={self.eval.scoring!r} ({SCORINGS[self.eval.scoring]}): what the clients learn on "
               f"{', '.join(choice)} would never reach their score. Set train.format: {want} (or eval.scoring: "
               f"{next(k for k, v in FORMAT_OF_SCORING.items() if v == self.train.format)}, which reads "
               f"{self.train.format})")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from legokit.utils import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        return _build(cls, d or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        return cls.from_dict(read_yaml_mapping(path, "config file", "see configs/ for the shipped profiles",
                                               "a mapping of sections"))

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> ExperimentConfig:
        """A copy with dotted overrides applied, e.g. ``["fed.rounds=3", "lora.rank=4", "notebook.context=512"]``."""
        d = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
        for key, value in items:
            parts = key.split(".")
            if parts[0] == "notebook" and len(parts) == 2:  # free-form: any name is a valid key
                d["notebook"][parts[1]] = value
                continue
            node, cls = d, ExperimentConfig
            for p in parts[:-1]:
                _known_key(cls, p, key)
                node, cls = node[p], SECTIONS.get(p)
                if cls is None:
                    raise LegokitError(f"override {key!r}: {p!r} is not a section")
            _known_key(cls, parts[-1], key)
            node[parts[-1]] = value
        return ExperimentConfig.from_dict(d)


def _is_literal(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_literal(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise LegokitError(f"override {text!r} must look like section.key=value, e.g. fed.rounds=3")
    key, raw = text.split("=", 1)
    if re.fullmatch(r"\s*\d+:\d+\s*", raw):  # YAML 1.1 would read 2:4 as the base-60 number 124
        return key.strip(), raw.strip()
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:  # e.g. an unclosed [ or {: name the override, not a YAML parser frame
        problem = str(getattr(err, "problem", None) or err).strip()
        fix = ("close it: a list is written [a, b], a mapping {k: v}" if raw.lstrip().startswith(("[", "{")) else
               f"quote a string that holds YAML punctuation, e.g. {key.strip()}='\"{raw.strip()}\"'")
        raise LegokitError(f"override {text!r}: the value {raw!r} is not valid YAML ({problem}); {fix}") from err


def _known_key(cls, key: str, context: str) -> None:
    names = [f.name for f in fields(cls)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LegokitError(f"unknown config key {context!r}: {hint}valid keys here: {names}")


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise LegokitError(f"config section {prefix.rstrip('.') or 'top level'} must be a mapping, got {d!r}")
    kwargs = {}
    types = {f.name: f for f in fields(cls)}
    for key, value in d.items():
        _known_key(cls, key, prefix + key)
        sub = SECTIONS.get(key) if cls is ExperimentConfig else None
        if sub is not None:
            kwargs[key] = value if isinstance(value, sub) else _build(sub, value or {}, prefix + key + ".")
        else:
            kwargs[key] = _coerce(types[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a value of the wrong type reached a comparison
        raise LegokitError(f"config section {prefix.rstrip('.') or 'top level'}: {err}") from err


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Check a scalar against its annotated type; ints are accepted where floats are expected."""
    ann = str(f.type)
    if value is None:
        if "None" in ann:
            return None
        raise LegokitError(f"config key {where!r} cannot be null")
    base = ann.split("|")[0].strip()
    if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    expected = {"int": int, "str": str, "bool": bool}.get(base)
    if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        hint = (" (YAML reads an unquoted N:M such as 2:4 as a base-60 number: write it quoted, \"2:4\")"
                if expected is str and isinstance(value, int) else "")
        raise LegokitError(f"config key {where!r} must be {base}, got {value!r} ({type(value).__name__}){hint}")
    if base.startswith("list") and not isinstance(value, list):
        raise LegokitError(f"config key {where!r} must be a list, got {value!r}")
    if base == "float" and not isinstance(value, (int, float)):
        raise LegokitError(f"config key {where!r} must be a number, got {value!r}")
    return value


def load_config(path_or_profile: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML file, or a shipped profile by name (``quick``, ``full``), then apply overrides."""
    path = Path(path_or_profile)
    if not path.suffix and not path.exists():
        path = CONFIGS_DIR / f"{path_or_profile}.yaml"
    cfg = ExperimentConfig.from_yaml(path)
    return cfg.with_overrides(overrides) if overrides else cfg


def notebook_config(notebook: str, profile: str, overrides: Mapping[str, Any] | list[str] | None = None
                    ) -> ExperimentConfig:
    """The config a notebook runs with: its own sizes when it has them, else the shipped profile.

    One rule: ``configs/notebooks/<notebook>-<profile>.yaml`` when that file exists, else
    ``configs/<profile>.yaml``. Notebook parameters (seed, tasks, sparsities, ...) go in ``overrides``.

    Args:
        notebook: the notebook's file stem, number included, e.g. ``"04_lego_experiment"``.
        profile: ``"quick"``, ``"full"``, or another profile that has a file.
        overrides: dotted overrides applied last, as in ``ExperimentConfig.with_overrides``.
    Returns:
        the validated ``ExperimentConfig``.
    Raises:
        LegokitError: neither file exists (the message names both and the profiles there are), or the
            file or an override is invalid.
    """
    own = CONFIGS_DIR / "notebooks" / f"{notebook}-{profile}.yaml"
    shared = CONFIGS_DIR / f"{profile}.yaml"
    path = own if own.is_file() else shared
    if not path.is_file():
        found = {p.stem for p in CONFIGS_DIR.glob("*.yaml")}
        found |= {p.stem.removeprefix(f"{notebook}-") for p in (CONFIGS_DIR / "notebooks").glob(f"{notebook}-*.yaml")}
        raise LegokitError(f"no config for notebook {notebook!r}, profile {profile!r}: looked for {own} and {shared}; "
                           f"profiles found: {sorted(found)}")
    cfg = ExperimentConfig.from_yaml(path)
    return cfg.with_overrides(dict(overrides) if isinstance(overrides, Mapping) else overrides) if overrides else cfg
