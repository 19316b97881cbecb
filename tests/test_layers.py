"""The house rules of the package, checked on its source: each concept defined once, the core free of presentation.

- The experiment's conditions are named once (``names.CONDITIONS``): ``experiment`` runs that very object and
  ``claims`` orders its tables by it; how a condition behaves is an attribute of its strategy.
- Scoring is defined once: only ``evaluate`` turns held-out windows into a perplexity.
- No core module imports presentation (matplotlib, seaborn, ipywidgets, ``legokit.viz``, ``legokit.widgets``).
- Every name a notebook imports from a module of the experiment layer is still importable from there.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from legokit import claims, evidence, experiment, names
from legokit.blocks import extract_blocks
from legokit.strategy import build_strategy

ROOT = Path(__file__).resolve().parents[1]
LEGOKIT = ROOT / "legokit"


def _modules() -> dict[str, ast.Module]:
    """``{dotted name relative to legokit: parsed source}`` of every module of the package, subpackages included."""
    return {".".join(p.relative_to(LEGOKIT).with_suffix("").parts): ast.parse(p.read_text())
            for p in sorted(LEGOKIT.rglob("*.py"))}


# ----- conditions ------------------------------------------------------------------------------------------------
def test_the_conditions_are_named_once_and_claims_order_by_the_list_experiment_runs():
    assert experiment.CONDITIONS is names.CONDITIONS
    assert claims.CONDITIONS is experiment.CONDITIONS
    shuffled = {c: {"seed": 0} for c in [*reversed(names.CONDITIONS), "another"]}
    assert list(claims._ordered(shuffled)) == [*names.CONDITIONS, "another"]
    # no other literal lists the conditions (as claims.ORDER once did beside experiment.CONDITIONS)
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if not isinstance(node, (ast.Dict, ast.Tuple, ast.List, ast.Set)) or not items:
                continue
            strings = {n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            if {"fedavg_dense", "lego", "centralized"} <= strings:
                assert name == "names", f"legokit/{name}.py lists the conditions again (line {node.lineno})"


CALIB = ["The quick brown fox jumps over the lazy dog. " * 4, "Paris is the capital of France. " * 4] * 2


def test_each_condition_s_behaviour_is_an_attribute_of_its_strategy(tiny):
    """``has_global`` (False only for local) and ``pools_clients`` (True only for centralized), for every condition."""
    from legokit.config import ExperimentConfig

    llm, tok = tiny
    blocks = extract_blocks(llm, tok, sparsities=(0.0, 0.5), method="magnitude", pattern="unstructured",
                            calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)
    cfg = ExperimentConfig.from_dict({"model": "tiny-llama", "prune": {"sparsities": [0.0, 0.5]},
                                      "fed": {"num_clients": 2}})
    for condition in names.CONDITIONS:
        strategy = build_strategy(experiment.condition_config(cfg, condition), llm, blocks, progress=False)
        assert (strategy.has_global, strategy.pools_clients) == (condition != "local", condition == "centralized")
        with pytest.raises(AttributeError):
            strategy.has_global = True  # read-only: set by build_strategy


# ----- scoring -----------------------------------------------------------------------------------------------------
def _calls(fn: ast.AST) -> set[str]:
    """The names of the functions ``fn`` calls (``f(...)`` and ``x.f(...)`` both give ``f``)."""
    out = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out





def test_scoring_is_defined_once():
    """Only ``evaluate`` turns windows into a perplexity: no function elsewhere calls window_nlls and exponentiates,
    and evaluate's perplexity and score_model share ``windows_perplexity``."""
    functions = {f"{name}.{fn.name}": _calls(fn) for name, tree in _modules().items() for fn in ast.walk(tree)
                 if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))}
    own = sorted(f for f, calls in functions.items() if {"window_nlls", "exp"} <= calls)
    assert not own, f"a perplexity computed outside evaluate.windows_perplexity: {own}"
    assert [f for f, calls in functions.items() if "windows_perplexity" in calls] == [
        "evaluate.perplexity", "evaluate.score_model"]
    assert "exp" in functions["evaluate.windows_perplexity"]


def test_per_item_files_are_read_in_one_place():
    """JSON lines of per-item records are parsed only by ``evaluate.read_items``."""
    readers = [name for name, tree in _modules().items() for fn in ast.walk(tree)
               if isinstance(fn, ast.FunctionDef) and "splitlines" in _calls(fn) and "loads" in _calls(fn)
               and name in ("experiment", "claims", "evidence", "evaluate")]
    assert readers == ["evaluate"]


# ----- presentation ------------------------------------------------------------------------------------------------
PRESENTATION = ("matplotlib", "seaborn", "ipywidgets", "legokit.viz", "legokit.widgets")
# Modules that may draw: the presentation layer itself and the command line.
FRONT = re.compile(r"^(viz|widgets|cli)(\.|$)|plots")
# Modules that draw on purpose although they are not presentation, and why.
DRAWS = {"sweep": "a sweep writes summary.png beside results.csv (viz.plot_sweep_summary)"}



def _presentation_imports(tree: ast.Module) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods = [node.module] + ([f"legokit.{a.name}" for a in node.names] if node.module == "legokit" else [])
        else:
            continue
        out += [f"{m} (line {node.lineno})" for m in mods if any(m == p or m.startswith(p + ".") for p in PRESENTATION)]
    return out


def test_no_core_module_imports_presentation():
    offenders = {}
    for name, tree in _modules().items():
        if FRONT.search(name) or name in DRAWS:
            continue
        found = _presentation_imports(tree)
        if found:
            offenders[name] = found
    assert not offenders, f"core modules import presentation: {offenders}"


def test_the_presentation_check_sees_an_import_in_a_function_body():
    tree = ast.parse("def f():\n    from legokit import viz\n    import matplotlib.pyplot as plt\n")
    assert _presentation_imports(tree) == ["legokit.viz (line 2)", "matplotlib.pyplot (line 3)"]


# ----- what the notebooks import -----------------------------------------------------------------------------------
def _notebook_sources() -> dict[str, str]:
    """``{notebook: its code cells' source}``."""
    return {p.name: "\n".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"]
                              if c["cell_type"] == "code") for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}


@pytest.mark.parametrize("module", ["claims", "report", "evaluate", "experiment", "learning", "strategy",
                                    "federation", "evidence", "analysis", "viz", "widgets", "data", "blocks"])
def test_every_name_a_notebook_imports_from_legokit_is_there(module):
    import importlib

    mod = importlib.import_module(f"legokit.{module}")
    used = set()
    for src in _notebook_sources().values():
        for group in re.findall(rf"from legokit\.{module} import ([\w, ]+)", src):
            used |= {n.split(" as ")[0].strip() for n in group.split(",") if n.strip()}
        used |= set(re.findall(rf"\b{module}\.(\w+)", src)) if re.search(rf"from legokit import .*\b{module}\b",
                                                                           src) else set()
    assert [n for n in sorted(used) if not hasattr(mod, n)] == []


def test_claims_hands_on_the_evidence_the_notebook_calls_there():
    assert (claims.evidence, claims.evidence_table, claims.claim_verdicts) == (
        evidence.evidence, evidence.evidence_table, evidence.claim_verdicts)
