"""Config dataclasses: defaults round-trip through YAML, bad values fail with a clear message."""

import pytest

from legokit.config import CONFIGS_DIR, ExperimentConfig, LoraConfig, PruneConfig, load_config
from legokit.utils import LegokitError


def test_yaml_round_trip(tmp_path):
    cfg = ExperimentConfig().with_overrides(["fed.rounds=3", "lora.rank=4", "prune.pattern=2:4"])
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
        ("data.alpha=0", "must be > 0"),
        ("lora.rank=two", "must be int"),
        ("fed.client_sparsities=[0.0, 0.9, 0.5, 0.75]", "extracts only"),
        ("fed.devices=[phone, phone]", "one per client"),
        ("rounds=3", "unknown config key 'rounds'"),
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
    assert ExperimentConfig().with_overrides(["prune.pattern=2:4"]).prune.pattern == "2:4"


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
