"""SparseGPT's OBS pruning with reconstruction on small correlated inputs."""

from __future__ import annotations

import pytest
import torch

from legokit.prune import magnitude_scores, prune_mask
from legokit.sparsegpt import sparsegpt_prune
from legokit.utils import LegokitError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- SparseGPT --------------------------------------------------------------------------------------------
def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    base = torch.randn(n, d // 4, generator=g)
    return base @ torch.randn(d // 4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)  # (n, d)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstruction_beats_magnitude_at_the_same_density(pattern):
    X = _correlated_inputs(512, 64, seed=3)
    W = torch.randn(16, 64, generator=_gen(4))
    H = 2 * X.T @ X / X.shape[0]
    W_new, keep = sparsegpt_prune(W, H, 0.5, pattern, blocksize=16)
    mag = prune_mask(magnitude_scores(W), 0.5, pattern)
    assert (~keep).sum() == (~mag).sum()  # same density
    assert (W_new[~keep] == 0).all()

    def err(w: torch.Tensor) -> float:
        return float((X @ W.T - X @ w.T).square().sum())

    assert err(W_new) < 0.5 * err(W * mag)
    assert err(W_new) < err(W * keep)  # the reconstruction itself helps, not only the mask
    if pattern == "2:4":
        assert ((~keep).reshape(16, 16, 4).sum(-1) == 2).all()
    else:
        assert ((~keep).sum(1) == 32).all()


def test_sparsegpt_within_makes_nested_masks_and_zero_is_identity():
    X = _correlated_inputs(256, 32, seed=5)
    W = torch.randn(8, 32, generator=_gen(6))
    H = 2 * X.T @ X / X.shape[0]
    same, all_kept = sparsegpt_prune(W, H, 0.0)
    assert torch.equal(same, W) and all_kept.all()
    within = None
    masks = []
    for s in (0.25, 0.5, 0.75):
        _, within = sparsegpt_prune(W, H, s, blocksize=8, within=within)
        masks.append(within)
    assert not (masks[1] & ~masks[0]).any() and not (masks[2] & ~masks[1]).any()
    with pytest.raises(LegokitError, match="shape"):
        sparsegpt_prune(W, H[:4, :4], 0.5)
