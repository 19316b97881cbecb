"""Config dataclasses: defaults round-trip through YAML, bad values fail with a clear message; notebooks read
their sizes from configs/."""

import ast
import json
import re

import pytest

from legokit.config import CONFIGS_DIR, ExperimentConfig, LoraConfig, PruneConfig, load_config, notebook_config
from legokit.utils import LegokitError


def test_yaml_round_trip(tmp_path):
    cfg = ExperimentConfig().with_overrides(["fed.rounds=3", "lora.rank=4", "prune.pattern=2:4",
                                             "prune.sparsities=[0.0, 0.5]"])
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    back = ExperimentConfig.from_yaml(path)
    assert back == cfg
    assert back.fed.rounds == 3 and back.lora.rank == 4 and back.lora.scaling == 4.0


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_shipped_profiles_load(profile):
    cfg = load_config(profile)
    assert cfg.name == profile
    assert (CONFIGS_DIR / f"{profile}.yaml").is_file()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("fed.roundz=3", "did you mean 'rounds'"),
        ("prune.method=random", "prune.method='random' is unknown"),
        ("prune.sparsities=[0.0, 1.0]", "not in [0, 1)"),
        ("prune.pattern=4:2", "N < M"),
        ("fed.aggregator=mean", "fed.aggregator='mean' is unknown"),
        ("fed.broadcast=gossip", "fed.broadcast='gossip' is unknown"),
        ("data.tasks=[boolq, squad]", "unknown tasks ['squad']"),
        ("data.alpha=0", "data.alpha=0.0 must be a finite number > 0"),
        ("lora.rank=two", "must be int"),
        ("fed.client_sparsities=[0.0, 0.9, 0.5, 0.75]", "extracts only"),
        ("fed.devices=[phone, phone]", "one per client"),
        ("rounds=3", "unknown config key 'rounds'"),
        ("eval.scoring=lmeval", "eval.scoring='lmeval' is unknown: use one of ['harness', 'label']"),
        ("eval.items=random", "eval.items='random': use per_seed or first"),
        ("eval.n_blocks=0", "eval.n_blocks=0 must be >= 1"),
    ],
)
def test_bad_values_name_the_problem(override, needle):
    with pytest.raises(LegokitError, match=None) as err:
        ExperimentConfig().with_overrides([override])
    assert needle in str(err.value)


def test_unquoted_n_m_in_yaml_gets_a_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prune:\n  pattern: 2:4\n")  # YAML 1.1 reads this as the number 124
    with pytest.raises(LegokitError, match='write it quoted, "2:4"'):
        ExperimentConfig.from_yaml(path)
    assert ExperimentConfig().with_overrides(["prune.pattern=2:4", "prune.sparsities=[0.5]"]).prune.pattern == "2:4"


def test_dirichlet_needs_alpha():
    with pytest.raises(LegokitError, match="needs data.alpha"):
        ExperimentConfig.from_dict({"data": {"partition": "dirichlet"}})


def test_sections_validate_directly():
    with pytest.raises(LegokitError, match="lora.rank"):
        LoraConfig(rank=0)
    with pytest.raises(LegokitError, match="prune.sparsities is empty"):
        PruneConfig(sparsities=[])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(LegokitError, match="does not exist"):
        ExperimentConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(LegokitError, match="mapping"):
        ExperimentConfig.from_yaml(bad)


# ----- notebook configs: sizes live in configs/, never in notebooks ------------------------------------------------
NOTEBOOKS = sorted((CONFIGS_DIR.parent / "notebooks").glob("*.ipynb"))


def _profiles(tmp_path, monkeypatch):
    """A configs/ directory with one shared profile (quick) and one notebook file (nb-quick, nb-tiny)."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "quick.yaml").write_text("name: quick\nfed:\n  rounds: 2\n")
    (tmp_path / "notebooks" / "nb-quick.yaml").write_text("name: nb-quick\nfed:\n  rounds: 1\nnotebook:\n  step: 3\n")
    (tmp_path / "notebooks" / "nb-tiny.yaml").write_text("name: nb-tiny\n")
    monkeypatch.setattr("legokit.config.CONFIGS_DIR", tmp_path)


def test_notebook_config_prefers_the_notebooks_own_file(tmp_path, monkeypatch):
    _profiles(tmp_path, monkeypatch)
    own = notebook_config("nb", "quick")
    assert own.name == "nb-quick" and own.fed.rounds == 1 and own.notebook == {"step": 3}
    shared = notebook_config("other", "quick")
    assert shared.name == "quick" and shared.fed.rounds == 2 and shared.notebook == {}
    tweaked = notebook_config("nb", "quick", {"seed": 7, "notebook.step": 1})
    assert tweaked.seed == 7 and tweaked.notebook == {"step": 1} and tweaked.fed.rounds == 1
    assert notebook_config("nb", "quick", ["fed.rounds=4"]).fed.rounds == 4


def test_notebook_config_unknown_profile_names_what_exists(tmp_path, monkeypatch):
    _profiles(tmp_path, monkeypatch)
    with pytest.raises(LegokitError) as err:
        notebook_config("nb", "medium")
    msg = str(err.value)
    assert "nb-medium.yaml" in msg and str(tmp_path / "medium.yaml") in msg
    assert "['quick', 'tiny']" in msg  # the shared profile and the notebook's own
    with pytest.raises(LegokitError, match=r"profiles found: \['quick'\]"):
        notebook_config("other", "tiny")


def test_notebook_section_round_trips_and_validates(tmp_path):
    cfg = ExperimentConfig().with_overrides({"notebook": {"block_conditions": ["local", "lego"], "context": 256}})
    cfg = cfg.with_overrides(["notebook.error_layer_step=3"])
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    back = ExperimentConfig.from_yaml(path)
    assert back == cfg
    assert back.notebook == {"block_conditions": ["local", "lego"], "context": 256, "error_layer_step": 3}
    assert ExperimentConfig.from_dict({"notebook": None}).notebook == {}
    assert ExperimentConfig().to_dict()["notebook"] == {}
    with pytest.raises(LegokitError, match="notebook must be a mapping"):
        ExperimentConfig.from_dict({"notebook": [1, 2]})
    with pytest.raises(LegokitError, match="YAML literal"):
        ExperimentConfig(notebook={"f": object()})


def test_shipped_notebook_configs_name_a_notebook_and_load():
    stems = {p.stem for p in NOTEBOOKS}
    files = sorted((CONFIGS_DIR / "notebooks").glob("*.yaml"))
    assert files
    for path in files:
        notebook, _, profile = path.stem.rpartition("-")
        assert notebook in stems, f"{path.name} names no notebook (a typo falls back to configs/{profile}.yaml)"
        assert notebook_config(notebook, profile).name == path.stem
    # "full" means one thing for the experiment: the README's claims come from configs/full.yaml.
    assert not (CONFIGS_DIR / "notebooks" / "04_lego_experiment-full.yaml").exists()


def _code_cells(path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_hold_no_size_tables(path):
    for cell in _code_cells(path):
        src = _source(cell)
        assert not re.search(r"\bSIZE\s*=", src), f"{path.name}: sizes belong in configs/, not a SIZE dict"
        assert not re.search(r"\[\s*PROFILE\s*\]", src), f"{path.name}: a table indexed by PROFILE"
        assert not re.search(r"[\"']quick[\"']\s*:", src), f"{path.name}: a dict keyed by profile"


@pytest.mark.parametrize("profile", ["quick", "full"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_config_cell_resolves(path, profile):
    """Run the parameters cell and the notebook's one ``cfg = notebook_config(...)`` statement, nothing else."""
    cells = _code_cells(path)
    params = [_source(c) for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1
    calls = []
    for cell in cells:
        code = "\n".join(line for line in _source(cell).splitlines() if not line.lstrip().startswith(("%", "!")))
        calls += [s for s in ast.parse(code).body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Call)
                  and getattr(s.value.func, "id", None) == "notebook_config"]
    ns: dict = {"notebook_config": notebook_config}
    exec(params[0], ns)
    ns["PROFILE"] = profile
    if path.stem == "05_studio":  # the Studio reads its own config: notebook_config("05_studio", PROFILE)
        assert not calls, f"{path.name}: the Studio owns the config; the notebook passes PROFILE only"
        cfg = notebook_config(path.stem, ns["PROFILE"])
    else:
        assert len(calls) == 1, f"{path.name}: one cfg = notebook_config(...) statement"
        assert ast.literal_eval(calls[0].value.args[0]) == path.stem
        exec(compile(ast.Module(calls, type_ignores=[]), path.name, "exec"), ns)
        cfg = ns["cfg"]
    assert isinstance(cfg, ExperimentConfig)
    # Every notebook-only size the notebook indexes must be in the file it reads (.get has its own default).
    for key in re.findall(r"cfg\.notebook\[[\"'](\w+)[\"']\]", "".join(_source(c) for c in cells)):
        assert key in cfg.notebook, f"{path.name}, {profile}: notebook.{key} is missing from its config file"
