"""Bad input gets a clear error before any work, and a legitimate but costly setting a warning (issue 20, part 4).

Each test goes through the real entry point (``legokit.cli.main`` with real config loading, ``Studio.compare``,
the Studio widget) and checks that the message names the key or value, the problem and the fix. "Before any
work" is checked by making the work itself (``load_model``, ``run_experiment``, ``deploy``) fail the test if it
is reached.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from legokit.cli import build_parser, main
from legokit.config import ExperimentConfig, load_config
from legokit.utils import LegokitError, atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
# The quick profile on tiny-llama: what every CLI test below runs, so no asset is needed.
TINY = ["model=tiny-llama", "device=cpu"]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model is loaded or an experiment / deployment starts: the error had to come first."""
    def reached(*args, **kwargs):
        raise AssertionError("the work started before the bad input was refused")

    import legokit.experiment
    import legokit.flower.deployment
    import legokit.lmeval
    import legokit.models

    for module in [m for name, m in sys.modules.items() if name.startswith("legokit")]:
        if getattr(module, "load_model", None) is legokit.models.load_model:  # every module that imported it
            monkeypatch.setattr(module, "load_model", reached)
    monkeypatch.setattr(legokit.experiment, "run_experiment", reached)
    monkeypatch.setattr(legokit.flower.deployment, "deploy", reached)


def _run(tmp_path: Path, *overrides: str, config: str = "quick") -> list[str]:
    return ["run", "--config", config, "--out", str(tmp_path / "out"), "--set", *TINY, *overrides]


def _error(capsys) -> str:
    return capsys.readouterr().err


# ----- 4. the README's commands, and --clients ------------------------------------------------------------
def _readme_commands() -> list[str]:
    """Every ``legokit ...`` command the README's command table documents, with ``[optional]`` parts included and
    the first of ``a|b`` alternatives."""
    text = (ROOT / "README.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|") and "`legokit " in line]
    cmds = [c for line in table for c in re.findall(r"`(legokit [^`]+)`", line)]
    return [re.sub(r"\\?\|\w+", "", c.replace("[", "").replace("]", "")) for c in cmds]


def test_every_command_in_the_readme_table_parses_and_its_config_validates():
    cmds = _readme_commands()
    assert any(c.startswith("legokit flower up --clients 3 --config quick") for c in cmds), cmds
    from legokit.flower.cli import _config

    validated = 0
    for cmd in cmds:
        args = build_parser().parse_args(shlex.split(cmd)[1:])  # argparse exits (fails the test) on a bad one
        if getattr(args, "config", None) is None:
            continue
        if args.command == "flower":
            cfg = _config(args, preflight=False)  # the default LLM's shapes need `legokit setup`: checked below
        else:
            cfg = load_config(args.config, args.set)
        assert isinstance(cfg, ExperimentConfig)
        validated += 1
    assert validated == 2  # `legokit run` and `legokit flower up`


def test_flower_clients_cycles_the_profiles_blocks_and_zero_is_refused(tmp_path, capsys, monkeypatch):
    import legokit.flower.deployment

    seen = {}

    def deploy(cfg, run_dir, **kwargs):  # stand-in for the deployment: record what would run, start nothing
        seen["cfg"] = cfg
        raise LegokitError("stopped by the test")

    monkeypatch.setattr(legokit.flower.deployment, "deploy", deploy)
    readme = next(c for c in _readme_commands() if c.startswith("legokit flower up"))
    argv = shlex.split(readme)[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "flower")
    assert main([*argv, "--set", *TINY]) == 2
    err = _error(capsys)
    assert "stopped by the test" in err
    assert seen["cfg"].fed.num_clients == 3 and seen["cfg"].fed.client_sparsities == [0.0, 0.25, 0.5]
    assert "--clients 3: the config's fed.client_sparsities [0.0, 0.25, 0.5, 0.75]" in err
    # a list of the user's own must have N entries: it is not cycled
    assert main([*argv, "--set", *TINY, "fed.client_sparsities=[0.0, 0.5, 0.5]"]) == 2
    assert seen["cfg"].fed.client_sparsities == [0.0, 0.5, 0.5]
    seen.clear()
    assert main(["flower", "up", "--clients", "0", "--config", "quick", "--out", str(tmp_path / "f0")]) == 2
    assert "--clients 0: a federation needs at least 1 client" in _error(capsys) and not seen


def _have_data() -> bool:
    try:
        from legokit.data import load_task

        return all(load_task(t, "train") for t in ("boolq", "commonsense_qa", "nq_open", "asdiv"))
    except Exception:
        return False


needs_data = pytest.mark.skipif(not _have_data(), reason="task data not prepared: run `legokit setup` first")


@needs_data
@pytest.mark.flower
def test_readme_flower_command_runs_three_supernodes_on_tiny_llama(tmp_path, capsys):
    readme = next(c for c in _readme_commands() if c.startswith("legokit flower up"))
    argv = shlex.split(readme)[1:]
    out = tmp_path / "flower"
    argv[argv.index("--out") + 1] = str(out)
    small = ["prune.n_calib=4", "prune.seq_len=32", "lora.rank=2", "lora.alpha=4.0", "train.local_steps=1",
             "train.batch_size=2", "train.max_len=64", "fed.rounds=1", "data.train_examples=6", "eval.blocks=false",
             "eval.base=false", "eval.n=2", "eval.ppl_texts=1", "eval.seq_len=32"]
    assert main([*argv, "--threads", "1", "--round-timeout", "300", "--timeout", "500", "--set", *TINY, *small]) == 0
    assert "3 SuperNodes + 1 SuperLink on loopback" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert sorted((m["client"], m["sparsity"], m["status"]) for m in lines) == [(0, 0.0, "ok"), (1, 0.25, "ok"),
                                                                                (2, 0.5, "ok")]


# ----- 6. tracebacks that are now errors ------------------------------------------------------------------
def test_a_yaml_syntax_error_in_set_names_the_override_and_how_to_write_it(tmp_path, capsys, no_work):
    assert main(_run(tmp_path, "data.tasks=[boolq, piqa")) == 2
    err = _error(capsys)
    assert "override 'data.tasks=[boolq, piqa'" in err and "is not valid YAML" in err
    assert "close it: a list is written [a, b]" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "run"])
def test_device_cuda_on_a_cpu_only_torch_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, no_work,
                                                                           command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as a CPU-only torch build answers
    argv = (["eval", "--model", "tiny-llama", "--device", "cuda", "--out", str(tmp_path / "out")] if command == "eval"
            else _run(tmp_path, "device=cuda"))
    assert main(argv) == 2
    err = _error(capsys)
    assert "device 'cuda'" in err and "sees no CUDA GPU" in err and "use device 'cpu'" in err
    assert not (tmp_path / "out").exists()


def test_legokit_cache_pointing_at_a_file_names_the_variable(tmp_path, capsys, monkeypatch, no_work):
    afile = tmp_path / "cache.txt"
    afile.write_text("not a directory")
    monkeypatch.setenv("LEGOKIT_CACHE", str(afile))
    assert main(["setup"]) == 2
    err = _error(capsys)
    assert f"LEGOKIT_CACHE={str(afile)!r}" in err and "is a file" in err and "point LEGOKIT_CACHE at a directory" in err
    monkeypatch.setenv("LEGOKIT_CACHE", str(afile / "sub"))  # a file above the cache directory
    assert main(["run", "--config", "quick", "--out", str(tmp_path / "out")]) == 2  # the default LLM is cached
    assert f"{str(afile)!r} is a file" in _error(capsys)


CALIB = ["The quick brown fox jumps over the lazy dog. " * 4, "Paris is the capital of France. " * 4] * 2


def _tiny_run(run: Path, aggregator: str = "heteagg") -> ExperimentConfig:
    """A finished 1-round tiny-llama run laid out as ``run_experiment`` writes it (no asset needed)."""
    from legokit.blocks import extract_blocks
    from legokit.data import Example
    from legokit.federation import run_federation
    from legokit.models import load_model

    cfg = ExperimentConfig.from_dict({
        "model": "tiny-llama", "device": "cpu",
        "prune": {"sparsities": [0.0, 0.5], "n_calib": 4, "seq_len": 32}, "lora": {"rank": 2, "alpha": 4.0},
        "train": {"local_steps": 1, "batch_size": 2, "max_len": 64},
        "fed": {"num_clients": 2, "rounds": 1, "aggregator": aggregator},
        "data": {"tasks": ["boolq", "asdiv"], "train_examples": 4}, "eval": {"base": False}})
    llm, tok = load_model(cfg.model)
    blocks = extract_blocks(llm, tok, sparsities=tuple(cfg.prune.sparsities), n_calib=4, seq_len=32, texts=CALIB,
                            progress=False)
    for i, b in enumerate(blocks):
        b.save(run / "blocks" / f"{i}")
    atomic_write_json(run / "blocks" / "index.json", {"blocks": [b.id for b in blocks]})
    cfg.to_yaml(run / "config.yaml")
    parts = [[Example(task=t, prompt=f"{t} {i}: {i} plus {i}?", response=str(2 * i), uid=f"{t}-{i}")
              for i in range(2)] for t in ("boolq", "asdiv")]
    run_federation(cfg, llm, tok, blocks, parts, run, progress=False)
    return cfg


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A finished heteagg run and a finished local run (each client keeps its own adapter)."""
    runs = {}
    for aggregator in ("heteagg", "local"):
        runs[aggregator] = tmp_path_factory.mktemp(aggregator)
        _tiny_run(runs[aggregator], aggregator)
    return runs


def test_export_onto_an_existing_file_is_refused_before_the_model_is_rebuilt(tmp_path, capsys, tiny_runs, no_work):
    afile = tmp_path / "model.bin"
    afile.write_text("keep me")
    assert main(["export", str(tiny_runs["heteagg"]), "--out", str(afile)]) == 2
    err = _error(capsys)
    assert f"--out {str(afile)!r} is an existing file" in err and "give a new path" in err
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("run,args,message", [
    ("heteagg", ["--model", "nope"], "unknown block 'nope': use 'global' or a block id or index (0: "),
    ("heteagg", ["--client", "0"], "drop --client and pass --model BLOCK"),
    ("local", [], "choose one with --client K (client: block = 0: "),
    ("local", ["--client", "5"], "client 5 is not in run"),
    ("local", ["--client", "1", "--model", "0"], "client 1 of run"),
    ("heteagg", ["--device", "cuda:7"], "device 'cuda:7'"),
])
def test_export_client_and_model_are_checked_before_the_model_is_rebuilt(tmp_path, capsys, tiny_runs, no_work, run,
                                                                         args, message):
    assert main(["export", str(tiny_runs[run]), *args, "--out", str(tmp_path / "x")]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "x").exists()


@needs_data
@pytest.mark.slow
def test_comparing_a_run_with_itself_says_pick_two_runs_in_code_and_in_the_widget(tmp_path):
    from legokit.studio import Studio
    from legokit.widgets import studio_widget

    small = {"device": "cpu", "prune.n_calib": 4, "prune.seq_len": 32, "train.max_len": 64, "train.batch_size": 2,
             "train.local_steps": 1, "eval.ppl_texts": 1, "eval.seq_len": 32}
    box = studio_widget(Studio(model="tiny-llama", overrides=small, workdir=tmp_path))
    for row in box.clients:
        row["examples"].value = 2
    box.run_button.click()
    box.studio.wait()
    assert box.studio.runs[0].status == "finished", box.studio.runs[0].error
    with pytest.raises(LegokitError, match="run A and run B are both run 1: pick two different runs"):
        box.studio.compare(1, 1)
    box.compare_a.value = box.compare_b.value = 1  # the two menus can name the same run
    box.compare_button.click()
    assert "both run 1: pick two different runs" in box.status.value and "press Run again" in box.status.value


# ----- 7. silences that are now errors, and one warning -----------------------------------------------------
def test_empty_eval_tasks_is_an_error_not_every_task(tmp_path, capsys, no_work):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny-llama\neval:\n  tasks: []\n")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = _error(capsys)
    assert "eval.tasks is empty" in err and "null) for every task" in err
    assert main(["eval", "--model", "tiny-llama", "--tasks", "--out", str(tmp_path / "out")]) == 2
    assert "eval.tasks is empty" in _error(capsys)


@pytest.mark.parametrize("override,message", [
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be a finite number >= 0"),
    ("train.weight_decay=.nan", "train.weight_decay=nan must be a finite number >= 0"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm=inf must be a finite number > 0 (e.g. 1.0; a large value"),
    ("train.lr=.inf", "train.lr=inf must be a finite number > 0, e.g. 3e-4"),
    ("lora.alpha=.inf", "lora.alpha=inf must be a finite number > 0"),
])
def test_non_finite_or_negative_training_numbers_are_refused(tmp_path, capsys, no_work, override, message):
    assert main(_run(tmp_path, override)) == 2
    assert message in _error(capsys)


def _smollm_shapes(path: Path) -> str:
    """A checkpoint directory with only the default LLM's config.json (SmolLM2-135M's shapes), no weights."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True).save_pretrained(path)
    return str(path)


def test_64_clients_at_the_default_global_rank_warn_with_the_memory_and_the_fix(tmp_path, capsys, monkeypatch):
    import legokit.experiment

    def run_experiment(cfg, out, **kwargs):  # the warning must come before the run; the run itself is not tested
        raise LegokitError("stopped by the test")

    monkeypatch.setattr(legokit.experiment, "run_experiment", run_experiment)
    model = f"model={_smollm_shapes(tmp_path / 'smol')}"
    argv = ["run", "--config", "configs/clients64.yaml", "--out", str(tmp_path / "out"), "--set", model]
    assert main([*argv, "fed.global_rank=null"]) == 2
    err = _error(capsys)
    assert err.index("legokit: warning:") < err.index("stopped by the test")
    assert "lora.rank x fed.num_clients = 8 x 64 = 512" in err
    assert re.search(r"one such adapter is 540 MiB.* up to about 6\.9 GiB, 13\.7x the LLM's float32 size \(513 MiB\)",
                     err), err
    assert "--set fed.global_rank=32" in err
    assert main(argv) == 2  # the shipped clients64 sets global_rank 32: no warning
    assert "warning" not in _error(capsys)
    assert main(["run", "--config", "quick", "--out", str(tmp_path / "out"), "--set", model]) == 2  # 4 clients
    assert "warning" not in _error(capsys)


# ----- 8. late checks that are now early ------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["eval.seq_len=1"], "eval.seq_len=1 must be >= 8"),
    (["eval.batch_size=0"], "eval.batch_size=0 must be >= 1"),
    (["prune.sparsities=[0.0, 0.5]", "fed.client_sparsities=null", "fed.devices=[server, laptop, phone, phone]"],
     "fed.devices has 'phone' (a budget of 30% of the LLM), but no level of prune.sparsities [0.0, 0.5] fits it: "
     "add 0.70"),
    (["prune.pattern=2:4"], "prune.sparsities has [0.25, 0.75], which prune.pattern='2:4' cannot give"),
    (["prune.sparsities=[0.0, 0.5, 0.5]"], "prune.sparsities=[0.0, 0.5, 0.5] repeats a level"),
    (["prune.method=sparsegpt", "prune.pattern=structured"], "use method 'wanda' or 'magnitude' for structured"),
    (["prune.pattern=3:7", "prune.sparsities=[0.0, 0.42857142857142855]", "fed.client_sparsities=null"],
     "prune.pattern='3:7' needs every pruned module's input size to be a multiple of 7"),
    (["lora.rank=48"], "lora.rank=48 is larger than model.layers.0.self_attn.k_proj (32x64)"),
])
def test_config_problems_found_late_before_are_refused_before_the_model_loads(tmp_path, capsys, no_work, overrides,
                                                                            message):
    assert main(_run(tmp_path, *overrides)) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_the_cpu_warns_before_the_run_and_float32_does_not(tmp_path, capsys, monkeypatch, dtype):
    import legokit.experiment

    def run_experiment(cfg, out, **kwargs):  # the warning must come before the run; the run itself is not tested
        raise LegokitError("stopped by the test")

    monkeypatch.setattr(legokit.experiment, "run_experiment", run_experiment)
    assert main(_run(tmp_path, f"dtype={dtype}")) == 2
    err = _error(capsys)
    assert err.index("legokit: warning:") < err.index("stopped by the test")
    assert f"dtype='{dtype}' puts the model in {dtype} on the CPU" in err and "--set dtype=float32" in err
    for ok in ("float32", "auto"):
        assert main(_run(tmp_path, f"dtype={ok}")) == 2
        assert "warning" not in _error(capsys)
