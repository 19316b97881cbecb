"""Scores, masks and structured selection on small tensors and tiny-llama."""

from __future__ import annotations

import copy

import pytest
import torch

from legokit.models import linear_modules
from legokit.prune import (
    apply_masks,
    magnitude_scores,
    n_pruned,
    nested_masks,
    obs_scores,
    parse_pattern,
    prune_mask,
    resolve_sparsity,
    structured_select,
    structured_sizes,
    wanda_scores,
)
from legokit.utils import LegokitError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- scores -----------------------------------------------------------------------------------------------
def test_scores_are_magnitude_times_input_norm():
    w = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    norm = torch.tensor([2.0, 10.0])
    assert torch.equal(magnitude_scores(w), w.abs())
    assert torch.equal(wanda_scores(w, norm), torch.tensor([[2.0, 20.0], [6.0, 5.0]]))
    with pytest.raises(LegokitError, match="one norm per input"):
        wanda_scores(w, torch.ones(3))


def test_obs_scores_follow_the_inverse_hessian():
    # A diagonal Hessian: [H^-1]_jj is 1/h_j, so the saliency is w^2 h_j (up to dampening).
    w = torch.ones(2, 3)
    h = torch.diag(torch.tensor([1.0, 4.0, 9.0]))
    s = obs_scores(w, h, percdamp=0.0)
    assert torch.allclose(s[0], torch.tensor([1.0, 4.0, 9.0]))


# ----- masks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.3, 0.5, 0.75, 0.99])
def test_unstructured_mask_is_exact_in_every_row(sparsity):
    scores = torch.rand(7, 64, generator=_gen())
    keep = prune_mask(scores, sparsity, "unstructured")
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert ((~keep).sum(1) == n_pruned(sparsity, 64)).all()
    # what is kept scores at least as high as what is pruned, row by row
    for row, k in zip(scores, keep, strict=True):
        if (~k).any() and k.any():
            assert row[k].min() >= row[~k].max()


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_mask_holds_in_every_group(pattern, n, m):
    scores = torch.rand(5, 32, generator=_gen(1))
    keep = prune_mask(scores, None, pattern)
    zeros = (~keep).reshape(5, 32 // m, m).sum(-1)
    assert (zeros == n).all()
    assert torch.equal(keep, prune_mask(scores, n / m, pattern))
    assert prune_mask(scores, 0, pattern).all()  # 0 is the dense block for every pattern


def test_masks_from_the_same_scores_are_nested():
    scores = torch.randint(0, 4, (6, 40), generator=_gen(2)).float()  # many ties on purpose
    for pattern in ("unstructured", "structured"):
        masks = nested_masks(scores, [0.0, 0.25, 0.5, 0.75], pattern)
        for lo, hi in zip(masks, masks[1:], strict=False):
            assert not (hi & ~lo).any(), pattern  # kept at the higher sparsity => kept at the lower
        assert torch.equal(masks[2], prune_mask(scores, 0.5, pattern))


def test_structured_mask_prunes_whole_rows_with_lowest_scores():
    scores = torch.ones(4, 6)
    scores[1] *= 0.1
    scores[3] *= 0.2
    keep = prune_mask(scores, 0.5, "structured")
    assert torch.equal(keep.all(1), torch.tensor([True, False, True, False]))
    assert torch.equal(keep.any(1), keep.all(1))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True, "0.5", float("nan")])
def test_sparsity_outside_unit_interval_raises(bad):
    with pytest.raises(LegokitError, match=r"not in \[0, 1\)"):
        prune_mask(torch.rand(2, 8), bad)


def test_bad_patterns_raise_with_the_valid_ones():
    with pytest.raises(LegokitError, match="unstructured"):
        parse_pattern("blocky")
    for bad in ("4:4", "5:4", "0:4"):
        with pytest.raises(LegokitError, match="0 < N < M"):
            parse_pattern(bad)
    with pytest.raises(LegokitError, match="contradicts pattern '2:4'"):
        resolve_sparsity(0.25, "2:4")
    assert resolve_sparsity(None, "4:8") == 0.5
    with pytest.raises(LegokitError, match="multiple of 4"):
        prune_mask(torch.rand(2, 6), None, "2:4")


def test_apply_masks_checks_everything_before_changing_anything(tiny):
    llm, _ = tiny
    model = copy.deepcopy(llm)
    lin = linear_modules(model)
    names = list(lin)
    before = {n: m.weight.clone() for n, m in lin.items()}
    good = torch.zeros_like(lin[names[0]].weight, dtype=torch.bool)
    bad = torch.zeros(3, 3, dtype=torch.bool)
    with pytest.raises(LegokitError, match="shape"):
        apply_masks(model, {names[0]: good, names[1]: bad})
    with pytest.raises(LegokitError, match="does not have"):
        apply_masks(model, {names[0]: good, "model.layers.9.mlp.up_proj": good})
    assert all(torch.equal(before[n], m.weight) for n, m in lin.items())
    apply_masks(model, {names[0]: good})
    assert (lin[names[0]].weight == 0).all()


# ----- structured -------------------------------------------------------------------------------------------
SMOL = dict(hidden=576, intermediate=1536, num_heads=9, num_kv_heads=3, head_dim=64)


def _kept_fraction(sz, hidden, intermediate, num_heads, num_kv_heads, head_dim):
    kept = (2 * sz.heads + 2 * sz.kv_heads) * head_dim * hidden + 3 * hidden * sz.channels
    total = (2 * num_heads + 2 * num_kv_heads) * head_dim * hidden + 3 * hidden * intermediate
    return kept / total


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_structured_sizes_hit_the_target_and_fall_monotonically(sparsity):
    sz = structured_sizes(sparsity, **SMOL)
    assert abs(_kept_fraction(sz, **SMOL) - (1 - sparsity)) < 1e-3
    assert 1 <= sz.kv_heads <= 3 and 1 <= sz.heads_per_group <= 3
    sizes = [structured_sizes(s, **SMOL) for s in (0.25, 0.5, 0.75)]
    for a, b in zip(sizes, sizes[1:], strict=False):
        assert b.kv_heads <= a.kv_heads and b.heads_per_group <= a.heads_per_group
        assert b.channels <= a.channels


def test_structured_sparsity_that_removes_every_head_raises():
    with pytest.raises(LegokitError, match="every attention head"):
        structured_sizes(0.95, **SMOL)


def test_structured_select_keeps_gqa_groups_consistent():
    d, H, G, hid, inter = 4, 4, 2, 8, 12
    g = _gen(7)
    shapes = {"q_proj": (H * d, hid), "k_proj": (G * d, hid), "v_proj": (G * d, hid), "o_proj": (hid, H * d),
              "gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    scores = {k: torch.rand(s, generator=g) for k, s in shapes.items()}
    scores["k_proj"][:d] += 10  # group 0 is clearly the most important
    sz = structured_sizes(0.5, hidden=hid, intermediate=inter, num_heads=H, num_kv_heads=G, head_dim=d)
    sel = structured_select(scores, sz, num_heads=H, num_kv_heads=G, head_dim=d)
    q_rows, kv_rows = sel["q_proj"][0], sel["k_proj"][0]
    assert len(q_rows) == sz.heads * d and len(kv_rows) == sz.kv_heads * d
    assert torch.equal(sel["o_proj"][1], q_rows) and torch.equal(sel["gate_proj"][0], sel["down_proj"][1])
    heads = q_rows.reshape(-1, d)[:, 0] // d
    groups = kv_rows.reshape(-1, d)[:, 0] // d
    assert torch.equal(heads // (H // G), groups.repeat_interleave(sz.heads_per_group))  # in kept groups
    if sz.kv_heads < G:
        assert 0 in groups.tolist()
