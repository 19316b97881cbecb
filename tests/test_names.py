"""legokit.names: every list of allowed names has one owner, and the modules that use a list use that object."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from legokit import aggregate, claims, config, data, evaluate, models, names, prune
from legokit.data import partitions
from legokit.utils import LegokitError

LEGOKIT = Path(names.__file__).parent


def test_implementations_match_the_names() -> None:
    assert tuple(data.TASKS) == names.TASK_NAMES
    assert tuple(aggregate.AGGREGATORS) == names.AGGREGATOR_NAMES


@pytest.mark.parametrize(("module", "attr"), [
    (config, "METHODS"), (prune, "METHODS"), (config, "CALIBRATION_MODES"), (prune, "CALIBRATION_MODES"),
    (prune, "PATTERNS"), (config, "UNCOVERED_RULES"), (aggregate, "UNCOVERED_RULES"), (config, "PARTITIONS"),
    (partitions, "PARTITIONS"), (config, "LORA_TARGETS"), (models, "LORA_TARGETS"), (config, "DEFAULT_MODEL"),
    (models, "DEFAULT_MODEL"), (config, "SCORINGS"), (evaluate, "SCORINGS"), (claims, "THRESHOLDS"),
    (config, "DEVICE_PROFILES"),
])
def test_modules_share_the_owners_object(module, attr: str) -> None:
    assert getattr(module, attr) is getattr(names, attr)


def test_no_module_redefines_a_list_of_names() -> None:
    """No module of legokit assigns a top-level name that legokit.names owns (it imports it instead)."""
    owned = {n for n in vars(names) if n.isupper()}
    redefined = []
    for path in sorted(LEGOKIT.rglob("*.py")):
        if path.name == "names.py":
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            redefined += [f"{path.name}:{t.id}" for t in targets if isinstance(t, ast.Name) and t.id in owned]
    assert redefined == []


def test_config_validates_with_the_shared_lists() -> None:
    cfg = config.ExperimentConfig()
    assert cfg.model == names.DEFAULT_MODEL and tuple(cfg.lora.target_modules) == names.LORA_TARGETS
    with pytest.raises(LegokitError, match=r"data.tasks has unknown tasks \['nope'\]: use names from \['asdiv'"):
        config.DataConfig(tasks=["nope"])
    with pytest.raises(LegokitError, match="eval.items='all': use per_seed or first"):
        config.EvalConfig(items="all")
    with pytest.raises(LegokitError, match="eval.scoring='x' is unknown: use one of \\['harness', 'label'\\]"):
        config.EvalConfig(scoring="x")


@pytest.mark.parametrize("pattern", ["unstructured", "structured", "2:4", "4:8"])
def test_config_and_prune_accept_the_same_patterns(pattern: str) -> None:
    # levels every pattern can give: an N:M pattern has only 0 and N/M (2:4 and 4:8: 0.5)
    assert config.PruneConfig(pattern=pattern, sparsities=[0.0, 0.5]).pattern == pattern
    assert str(prune.parse_pattern(pattern)) == pattern


@pytest.mark.parametrize("pattern", ["2 : 4", " 2:4", "4:2", "blocky", "N:M"])
def test_config_and_prune_reject_the_same_patterns(pattern: str) -> None:
    with pytest.raises(LegokitError):
        config.PruneConfig(pattern=pattern)
    with pytest.raises(LegokitError):
        prune.parse_pattern(pattern)


def test_config_imports_nothing_downstream() -> None:
    """config (and names, which it imports) import only utils from legokit, at any depth of the source; config's
    privacy section lives in privacy/settings, whose only import of the rest (the accountant, which resolves a
    target epsilon) is inside the function that needs it."""
    settings = ast.parse((LEGOKIT / "privacy" / "settings.py").read_text())
    top = {n.module for n in settings.body if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in top if m.startswith("legokit")} == {"legokit.utils"}
    for name in ("config.py", "names.py"):
        tree = ast.parse((LEGOKIT / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        allowed = {"legokit.names", "legokit.utils", "legokit.privacy.settings"}
        assert {m for m in imported if m.startswith("legokit")} <= allowed, name
