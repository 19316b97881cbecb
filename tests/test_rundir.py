"""A run directory that never lies (issue 20, part 3): bound to its config before anything is written to it,
untouched by a run it refuses, a federation in which no client trained reported as failed, and every damaged
checkpoint an error that names the file and the fix before the model loads.

Every test drives ``legokit run`` (``legokit.cli.main``) on tiny-llama over a miniature prepared data tree
(``$LEGOKIT_CACHE``), and damages real files on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rawdata import prepared_cache
from safetensors.torch import load_file

import legokit.experiment
from legokit.cli import main
from legokit.config import ExperimentConfig
from legokit.experiment import results_table, run_experiment

CONFIG = {
    "name": "tiny",
    "model": "tiny-llama",
    "prune": {"method": "wanda", "sparsities": [0.0, 0.5], "n_calib": 4, "seq_len": 32},
    "lora": {"rank": 2, "alpha": 4.0},
    "train": {"local_steps": 2, "batch_size": 2, "max_len": 64, "lr": 0.01},
    "fed": {"num_clients": 2, "rounds": 2, "client_sparsities": [0.0, 0.5]},
    "data": {"tasks": ["boolq", "asdiv"], "train_examples": 8, "partition": "task"},
    "eval": {"tasks": ["boolq"], "n": 2, "ppl_texts": 2, "seq_len": 32, "blocks": False},
}


def _paragraph(i: int) -> str:
    return f"Paragraph {i} about topic {i}: " + " ".join(f"w{i}x{j}" for j in range(40)) + "."


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache whose prepared data holds BoolQ and ASDiv splits and both corpora (the other tasks empty)."""
    rows: dict[str, list[dict]] = {}
    rows["BoolQ/dev.jsonl"] = [{"question": f"is claim {i} true", "title": f"T{i}", "answer": str(i % 3 == 0),
                                "passage": _paragraph(i)} for i in range(40)]
    rows["BoolQ/combined.jsonl"] = [{"question": f"q{i}", "passage": f"T{i} -- {_paragraph(i)}", "idx": i}
                                    for i in range(100, 140)]
    rows["ASDiv/test.jsonl"] = [{"passage": f"Tom has {i} apples.", "question": "How many apples?",
                                 "answer": f"{i} apples"} for i in range(30)]
    return prepared_cache(tmp_path_factory.mktemp("cache"), rows)


@pytest.fixture(autouse=True)
def _use_cache(cache, monkeypatch):
    monkeypatch.setenv("LEGOKIT_CACHE", str(cache))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def finished(cache, config_file, tmp_path_factory) -> Path:
    """A finished 2-round run of ``CONFIG`` (a template: tests damage copies of it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEGOKIT_CACHE", str(cache))
        assert main(["run", "--config", str(config_file), "--out", str(out)]) == 0
    return out


@pytest.fixture()
def model_loads(monkeypatch) -> list[str]:
    """The models ``legokit run`` loads in this test (recorded; they load as usual)."""
    calls: list[str] = []
    real = legokit.experiment.load_model

    def recording(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(legokit.experiment, "load_model", recording)
    return calls


def _run(capsys, config_file: Path, out: Path, *args: str) -> tuple[int, str, str]:
    """``legokit run --config config_file --out out *args``: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(["run", "--config", str(config_file), "--out", str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ----- 1. a directory is bound to its config before anything is written to it ----------------------------------
def test_a_new_run_never_reuses_the_blocks_a_failed_run_of_another_pruning_config_left(config_file, tmp_path, capsys,
                                                                                       model_loads):
    out = tmp_path / "run"
    # magnitude blocks are extracted, then the base evaluation fails: more held-out paragraphs than the corpus has
    code, _, err = _run(capsys, config_file, out, "--set", "prune.method=magnitude", "eval.ppl_texts=999")
    assert code == 2 and "999" in err
    assert (out / "blocks" / "index.json").is_file() and not (out / "results.json").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["prune"]["method"] == "magnitude"

    before, model_loads[:] = _files(out), []
    code, _, err = _run(capsys, config_file, out)  # wanda, without --resume
    assert code == 2
    assert "holds blocks of another config (prune.method: 'magnitude' there, 'wanda' here)" in err
    assert f"delete {out / 'blocks'}" in err
    assert model_loads == [] and _files(out) == before  # refused before the model loads; nothing rewritten

    # blocks saved before index.json recorded what they were made with: each block.json is compared instead
    index = out / "blocks" / "index.json"
    index.write_text(json.dumps({"blocks": json.loads(index.read_text())["blocks"]}))
    code, _, err = _run(capsys, config_file, out)
    assert code == 2 and "holds a magnitude unstructured block" in err and "prune.method='wanda'" in err

    shutil.rmtree(out / "blocks")  # the fix the message gives
    code, _, _ = _run(capsys, config_file, out)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert yaml.safe_load((out / "config.yaml").read_text())["prune"]["method"] == "wanda"
    assert [b["id"] for b in results["blocks"]] == ["wanda-unstructured-0", "wanda-unstructured-50"]


# ----- 2. nothing of a finished run is rewritten by a run that will be refused ------------------------------------
def test_a_run_refused_because_the_directory_holds_a_run_rewrites_nothing_there(finished, config_file, tmp_path,
                                                                               capsys, model_loads):
    out = _copy(finished, tmp_path)
    before = _files(out)
    code, _, err = _run(capsys, config_file, out, "--set", "eval.n=3")
    assert code == 2 and "already holds a run" in err and "--resume" in err
    code, _, err = _run(capsys, config_file, out, "--resume", "--set", "eval.n=3")
    assert code == 2 and "different config (eval.n: 2 there, 3 here)" in err
    assert model_loads == [] and _files(out) == before

    # resumed with its own config, the run reports one evaluation size: the base scores are the saved ones
    code, _, _ = _run(capsys, config_file, out, "--resume")
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["n"] == results["global"]["n"] == 2
    assert (out / "base_scores.json").read_bytes() == before["base_scores.json"]


# ----- 3. a run in which no client trained exits non-zero, and its table says so ----------------------------------
def test_a_run_in_which_no_client_ever_trained_exits_non_zero_and_its_table_says_so(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    # a learning rate this large gives every client a NaN loss in its second step, in every round
    code, stdout, err = _run(capsys, config_file, out, "--set", "train.lr=1.0e+30")
    assert code == 1
    assert "the run failed: no client trained in any of the 2 rounds" in err and "the loss is nan" in err
    assert "global LLM (untrained)" in stdout and "RUN FAILED" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["failed_rounds"] == [1, 2] and "untrained" in results["failure"]
    assert main(["report", str(out)]) == 0  # the report of the directory says so as well
    assert "global LLM (untrained)" in capsys.readouterr().out


def test_a_round_in_which_no_client_trained_is_named_in_the_results_and_the_table(tmp_path):
    cfg = ExperimentConfig.from_dict(CONFIG)
    results = run_experiment(cfg, tmp_path / "run", progress=False, inject_failures={2: [0, 1]})
    assert results["failed_rounds"] == [2]
    assert "no client trained in round 2 of 2" in results["failure"]
    assert "injected failure of client 0 in round 2" in results["failure"]
    table = results_table(results)
    assert "RUN FAILED: no client trained in round 2 of 2" in table and "(untrained)" not in table
    assert "round 2: [0, 1]" in table


# ----- 5. every damaged checkpoint is an error naming the file and the fix, before the model loads --------------
def _truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


DAMAGES = {
    # name: (damage the run directory, the file the error names, the fix it gives)
    "truncated adapter": (lambda d: _truncate(d / "adapters/round_002/adapter_model.safetensors"),
                          "adapters/round_002/adapter_model.safetensors", "--resume-round 1"),
    "truncated block mask": (lambda d: _truncate(d / "blocks/1/masks.safetensors", 0.9),
                             "blocks/1/masks.safetensors", "(the blocks are extracted again)"),
    "garbage state.json": (lambda d: (d / "state.json").write_text("{round: two"),
                           "state.json is damaged", "--resume-round 2"),
    "missing round folder": (lambda d: shutil.rmtree(d / "adapters/round_002"),
                             "adapters/round_002 is missing", "--resume-round 1"),
    "state past the config's rounds": (lambda d: (d / "state.json").write_text('{"round": 5}'),
                                       "says round 5 finished, past this config's fed.rounds=2", "--resume-round 2"),
    "truncated metrics.jsonl": (lambda d: _truncate(d / "metrics.jsonl", 0.9),
                                "metrics.jsonl line 4 is damaged", "--resume-round 1"),
    "broken adapter_config.json": (lambda d: (d / "adapters/round_002/adapter_config.json").write_text('{"r": 8'),
                                   "adapters/round_002/adapter_config.json is damaged", "--resume-round 1"),
    "adapter_config.json without a rank": (
        lambda d: (d / "adapters/round_002/adapter_config.json").write_text('{"peft_type": "LORA"}'),
        "adapters/round_002/adapter_config.json is damaged", "--resume-round 1"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resuming_a_damaged_run_directory_names_the_file_and_the_fix_before_the_model_loads(
        damage, finished, config_file, tmp_path, capsys, model_loads):
    out = _copy(finished, tmp_path)
    apply, named, fix = DAMAGES[damage]
    apply(out)
    before = _files(out)
    code, _, err = _run(capsys, config_file, out, "--resume")
    assert code == 2, err
    assert named in err and fix in err and "another output directory" in err
    assert model_loads == [] and _files(out) == before


def test_resuming_from_the_round_the_error_names_ends_as_the_undamaged_run_did(finished, config_file, tmp_path,
                                                                              capsys):
    out = _copy(finished, tmp_path)
    _truncate(out / "adapters/round_002/adapter_model.safetensors")
    code, _, err = _run(capsys, config_file, out, "--resume")
    assert code == 2 and "--resume-round 1" in err
    code, _, _ = _run(capsys, config_file, out, "--resume-round", "1")
    assert code == 0
    want = load_file(finished / "adapters/round_002/adapter_model.safetensors")
    got = load_file(out / "adapters/round_002/adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["client"]) for m in lines] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert json.loads((out / "state.json").read_text())["round"] == 2
    assert [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [1, 2]


def test_a_run_killed_after_a_round_and_resumed_ends_as_the_uninterrupted_run_did(finished, cache, config_file,
                                                                                  tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "LEGOKIT_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "legokit", "run", "--config", str(config_file), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "state.json").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed after round 1"
        proc.send_signal(signal.SIGKILL)  # kill -9: no handler runs, only what is on disk survives
    finally:
        proc.wait()
    assert not (out / "results.json").exists()
    code, _, _ = _run(capsys, config_file, out, "--resume")
    assert code == 0
    want = load_file(finished / "adapters/round_002/adapter_model.safetensors")
    got = load_file(out / "adapters/round_002/adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    scores = [json.loads((d / "results.json").read_text())["global"]["primary"] for d in (finished, out)]
    assert scores[0] == scores[1]
