"""The LEGO Studio on tiny-llama: it drives the one round loop, stops after a round, refuses impossible choices,
keeps the finished rounds of a failed run, compares runs, and its Run button redraws the loss picture; and the
controller imports no plotting or widget library."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

import legokit
from legokit.aggregate import coverage
from legokit.broadcast import load_uniform_adapter
from legokit.config import ExperimentConfig
from legokit.federation import run_federation
from legokit.strategy import LegoStrategy
from legokit.studio import Comparison, Studio, StudioRun
from legokit.utils import LegokitError
from legokit.viz import plot_compare
from legokit.widgets import studio_widget


def _have_data() -> bool:
    try:
        from legokit.data import load_task

        return all(load_task(t, "train") for t in ("commonsense_qa", "piqa"))
    except Exception:
        return False


_NEEDS_DATA = pytest.mark.skipif(not _have_data(), reason="task data not prepared: run `legokit setup` first")


def _trains(test):
    """A test that runs the Studio: it trains on the prepared task data, so `slow` (`make test-fast` never needs
    assets) and skipped without the data."""
    return pytest.mark.slow(_NEEDS_DATA(test))

SMALL = {"device": "cpu", "prune.n_calib": 4, "prune.seq_len": 32, "train.max_len": 64, "train.batch_size": 2,
         "eval.ppl_texts": 1, "eval.seq_len": 32}
PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """One tiny-llama Studio shared by the module (its model and blocks are loaded once)."""
    return Studio(model="tiny-llama", overrides=SMALL, workdir=tmp_path_factory.mktemp("studio"))


def _fresh(studio: Studio) -> Studio:
    """Another Studio on the same model and blocks directory (its own runs and listeners)."""
    llm, tok = studio.model()
    return Studio(model="tiny-llama", overrides=SMALL, workdir=studio.workdir, llm=llm, tokenizer=tok)


@_trains
def test_a_run_is_the_federation_loop(studio, tmp_path):
    run = studio.run(clients=2, rounds=2, local_steps=2, examples=[4, 3], tasks=["piqa", "commonsense_qa"])
    assert run.status == "finished" and run.error is None, run.traceback
    assert [len(p) for p in run.partitions] == [4, 3]
    assert "round 2/2 finished" in run.message
    llm, tok = studio.model()
    blocks = studio.blocks(run.cfg)
    ref = run_federation(run.cfg, llm, tok, blocks, studio.partitions(run.cfg), tmp_path / "ref", progress=False)
    got = {(ln["round"], ln["client"]): ln["losses"] for ln in run.lines}
    want = {(ln["round"], ln["client"]): ln["losses"] for ln in ref.checkpoint.metrics}
    assert got == want and len(got) == 4
    assert run.round_means() == pytest.approx([r["loss_last"].mean() for _, r in
                                               run.round_losses().groupby("round")])
    a, _ = load_uniform_adapter(run.run_dir / "adapters" / "round_002")
    b, _ = load_uniform_adapter(tmp_path / "ref" / "adapters" / "round_002")
    assert all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    # the coverage map counts the owners among the clients aggregated that round: dense + 50% block
    masks = [blocks[i].masks for i in ref.strategy.assignment]
    assert torch.equal(run.coverage[2], coverage(masks, run.module))
    assert set(run.coverage[2].unique().tolist()) == {1, 2}


@_trains
def test_stop_after_round_one_keeps_it(studio):
    st = _fresh(studio)
    st.on_update(lambda run: st.stop() if len(run.rounds) == 1 else None)
    run = st.run(rounds=3, local_steps=1, examples=[2, 2])
    assert run.status == "stopped"
    assert [r["round"] for r in run.rounds] == [1] and {ln["round"] for ln in run.lines} == {1}
    assert "stopped after round 1/3" in run.message
    assert run.score is not None  # the finished round's global model is scored like any other
    assert st.runs == [run] and not st.running


@_trains
@pytest.mark.parametrize("choices, message", [
    ({"clients": 3, "examples": 2}, "3 clients but only 2 examples"),
    ({"examples": [4, 0]}, "client 1 has a data size of 0"),
    ({"sparsities": [0.0, 0.3]}, "asks for 0.3 but prune.sparsities extracts only"),
    ({"tasks": ["piqa", "chess"]}, "unknown tasks ['chess']"),
    ({"clients": 2, "tasks": ["piqa"] * 3}, "3 tasks for 2 clients"),
])
def test_impossible_choices_are_refused(studio, choices, message):
    before = list(studio.runs)
    with pytest.raises(LegokitError, match=message.replace("[", r"\[").replace("]", r"\]")):
        studio.start(**choices)
    assert studio.runs == before and not studio.running


@_trains
def test_a_failing_round_keeps_the_finished_ones(studio, monkeypatch):
    st = _fresh(studio)
    ok = st.run(rounds=1, local_steps=1, examples=[2, 2])
    aggregate = LegoStrategy.aggregate

    def broken(self, rnd, results, *rest):
        if rnd == 2:
            raise RuntimeError("disk full (injected)")
        return aggregate(self, rnd, results, *rest)

    monkeypatch.setattr(LegoStrategy, "aggregate", broken)
    run = st.run(rounds=3, local_steps=1, examples=[2, 2])
    assert run.status == "failed" and "disk full (injected)" in run.error
    assert "failed in round 2/3" in run.message and "round 1 kept" in run.message
    assert [r["round"] for r in run.rounds] == [1] and len(run.losses()) == 2  # 2 clients x 1 step
    cmp = st.compare(ok, run)
    assert isinstance(plot_compare(cmp), Figure) and list(cmp.rounds["round"]) == [1]
    assert list(cmp.scores["status"]) == ["finished", "failed"]


@_trains
def test_a_failing_client_drops_out_of_the_round(studio):
    run = studio.run(rounds=1, local_steps=1, examples=[2, 2], inject_failures={1: [1]})
    assert run.status == "finished"
    table = run.round_losses()
    assert list(table["status"]) == ["ok", "failed"] and table["loss_last"].isna().tolist() == [False, True]
    assert "client 1 failed in round 1: LegokitError: injected failure" in run.message
    assert int(run.coverage[1].max()) == 1  # only client 0 (the dense block) was aggregated


@_trains
def test_compare_two_runs_and_merge_leaves_the_llm_as_it_was(studio):
    llm, _ = studio.model()
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    a = studio.run(rounds=1, local_steps=1, examples=[2, 2])
    b = studio.run(rounds=1, local_steps=1, examples=[2, 2], aggregator="fedavg", broadcast="merge")
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())
    cmp = studio.compare(a.index, b.index)
    assert len(plot_compare(cmp).axes) == 3  # losses, per round, perplexity
    assert list(cmp.rounds.columns) == ["round", f"run {a.index}", f"run {b.index}"]
    assert set(cmp.differences["key"]) == {"fed.aggregator", "fed.broadcast"}
    assert cmp.scores["held-out ppl"].notna().all()
    assert "config differences" in cmp._repr_html_()


@_trains
def test_the_run_button_redraws_the_losses(studio):
    box = studio_widget(_fresh(studio))
    for w, cls in ((box, "legokit-studio"), (box.run_button, "legokit-studio-run"),
                   (box.stop_button, "legokit-studio-stop"), (box.status, "legokit-studio-status"),
                   (box.losses, "legokit-studio-losses"), (box.coverage, "legokit-studio-coverage"),
                   (box.compare_button, "legokit-studio-compare-button")):
        assert cls in w._dom_classes
    before, cover = box.losses.value, box.coverage.value
    box.controls["local_steps"].value = 1
    box.controls["clients"].value = 3  # a third client row appears, with the profile's choices cycled
    assert len(box.clients) == 3 and box.values()["sparsities"] == [0.0, 0.5, 0.0]
    for row in box.clients:
        row["examples"].value = 2
    box.run_button.click()
    box.studio.wait()
    assert bytes(box.losses.value).startswith(PNG) and box.losses.value != before and box.coverage.value != cover
    assert "round 1/1 finished" in box.status.value and box.run_button.disabled is False
    box.clients[2]["examples"].value = 0
    box.run_button.click()
    assert "client 2 has a data size of 0" in box.status.value and len(box.studio.runs) == 1
    box.clients[2]["examples"].value = 2
    box.controls["aggregator"].value = "fedavg"
    box.run_button.click()
    box.studio.wait()
    assert [i for _, i in box.compare_a.options] == [1, 2] and (box.compare_a.value, box.compare_b.value) == (1, 2)
    box.compare_button.click()
    assert bytes(box.compare_image.value).startswith(PNG) and "fed.aggregator" in box.compare_table.value
    first = box.compare_image.value
    box.controls["broadcast"].value = "merge"
    box.run_button.click()
    box.studio.wait()
    assert (box.compare_a.value, box.compare_b.value) == (2, 3)  # the newest run against the one before it
    box.compare_button.click()
    assert box.compare_image.value != first and "fed.broadcast" in box.compare_table.value


def test_the_controller_imports_no_plotting_or_widgets():
    """``legokit.studio`` is the controller only: importing it loads neither matplotlib, ipywidgets nor viz."""
    heavy = ["matplotlib", "ipywidgets", "legokit.viz", "legokit.widgets", "seaborn"]
    code = f"import sys, legokit.studio; print([m for m in {heavy!r} if m in sys.modules])"
    root = str(Path(legokit.__file__).parents[1])  # this checkout's legokit, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]", out


def test_a_comparison_is_data_and_viz_draws_it(tmp_path):
    """``Studio.compare`` returns data (no figure on it); ``viz.plot_compare`` draws it."""
    runs = [StudioRun(i, ExperimentConfig(), [], tmp_path, status="finished") for i in (1, 2)]
    cmp = Comparison(*runs, rounds=None, differences=None, scores=None)
    assert not hasattr(cmp, "figure")
    fig = plot_compare(cmp)
    assert len(fig.axes) == 2  # unscored: no perplexity axis
    assert [ax.get_title() for ax in fig.axes] == ["loss per local step", "per round"]
