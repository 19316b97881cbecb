"""Numbers that must not move: every condition's per-round training losses, pinned.

The round loop was redesigned (one loop for ``run_federation``, Flower and the tour); a redesign may move
code, never numbers. ``tests/data/pinned_tiny_losses.json`` holds the losses the loop produced before the
redesign (commit 42bf5d6) for five conditions on tiny-llama: HeteAgg with the adapter and the merge
broadcast, ``local``, ``centralized`` and FlexLoRA, 3 clients on blocks at 0 / 50 / 75%, 3 rounds of 3 steps.
The quick demo's own losses (default LLM) are pinned the same way in ``tests/data/quick_demo_losses.json`` (its
first round is tested).
The federations themselves are in ``tests/pinned_runs.py``.

The pins were recorded on one CPU and must hold on any x86-64 CPU: float32 kernels of another CPU sum in
another order, and Adam carries that difference from step to step. ``bench/pin_spread.py`` measures it: it runs
every pinned federation under each kernel this machine can emulate (PyTorch's ``ATEN_CPU_CAPABILITY``, MKL's
``MKL_CBWR`` code paths, oneDNN's ISA cap, one thread) and under real changes of algorithm. ``REL_TINY`` and
``REL_QUICK`` sit above the largest kernel spread measured (docs/reproducibility.md gives the table) with a
margin; a real change moves the losses by far more, and ``test_a_real_change_breaks_the_pin...`` keeps that true.
"""

from __future__ import annotations

import pytest
from pinned_runs import TINY_CONDITIONS, max_rel_deviation, pinned, quick_losses, tiny_losses

# Tolerances: the largest kernel spread bench/pin_spread.py measured for each pin, times a margin (the table is in
# docs/reproducibility.md). tiny-llama: 2.4e-5 (PyTorch's non-vectorised kernels), 0 between the AVX-512 CPU that
# recorded the pins and an AVX2 one. The quick demo on the default LLM: 2.7e-4 (its losses move further: larger
# steps, a larger model).
REL_TINY = 1e-4
REL_QUICK = 2e-3
# A change of algorithm must move some loss by at least this many times the tolerance.
SEPARATION = 10


@pytest.mark.parametrize("condition", TINY_CONDITIONS)
def test_per_round_losses_of_every_condition_are_pinned(condition, tmp_path):
    got = tiny_losses(condition, tmp_path)
    dev = max_rel_deviation(got, pinned(condition))
    assert dev <= REL_TINY, f"{condition}: losses moved by {dev:.1e} (tolerance {REL_TINY:.0e})"


@pytest.mark.parametrize("change", [{"fed.aggregator": "fedavg_delta"}, {"train.lr": 0.011},
                                    {"fed.broadcast": "merge"}], ids=["fedavg_delta", "lr_x1.1", "merge"])
def test_a_real_change_breaks_the_pin_by_far_more_than_the_tolerance(change, tmp_path):
    """The tolerance is loose enough for another CPU's kernels and still catches a change of algorithm."""
    got = tiny_losses("heteagg-adapter", tmp_path, change)
    assert max_rel_deviation(got, pinned("heteagg-adapter")) > SEPARATION * REL_TINY


@pytest.mark.slow
def test_quick_demo_per_round_losses_are_pinned(tmp_path):
    """The quick demo's federation as pinned (``tests/data/quick_pin.yaml``: configs/quick.yaml as it was at 42bf5d6,
    on the default LLM), the first three steps of its first round: every client's losses equal those of the loop
    before the redesign (a client's batches are a prefix of its longer run's, ``train.batch_order``).

    This guards what tiny-llama cannot: the real model, its Wanda extraction on real calibration text, the task data
    and masked LoRA training with checkpointing on four real blocks; the rounds after it (aggregation, broadcast) are
    pinned on tiny-llama for five conditions. It takes a third of the time of both rounds (the suite stays within
    its 30 minutes); the kernel spread measured on the whole quick demo was already there in round 1
    (docs/reproducibility.md)."""
    got = quick_losses(tmp_path, {"fed.rounds": 1, "train.local_steps": 3})
    dev = max_rel_deviation(got, [[r, c, losses[:3]] for r, c, losses in pinned("quick") if r == 1])
    assert dev <= REL_QUICK, f"the quick demo's losses moved by {dev:.1e} (tolerance {REL_QUICK:.0e})"
