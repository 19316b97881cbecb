"""Masked LoRA layers, attach/detach, SVD re-factoring (tiny-llama, CPU, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import no_host_sync, random_factors, token_ids
from torch import nn

from legokit.config import LoraConfig
from legokit.lora import (
    MaskedLoraLinear,
    _MaskedLoraFn,
    attach_lora,
    delta_weight,
    detach_lora,
    lora_factors,
    lora_modules,
    svd_refactor,
)
from legokit.models import linear_modules, load_model
from legokit.slm import LinearView, pack_mask
from legokit.train import batch_loss, make_batch
from legokit.utils import LegokitError


def _random_masks(model: nn.Module, keep: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g) < keep for n, m in linear_modules(model).items()}


def _prune(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, m in linear_modules(model).items():
            m.weight.mul_(masks[n])


def _train_steps(model: nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on random sequences (loss on the second half of each)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    seqs = [(ids, [-100] * 6 + ids[6:]) for ids in token_ids(3, 12).tolist()]
    model.train()
    for _ in range(steps):
        loss, _ = batch_loss(model, make_batch(seqs, pad_id=2))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _effective_weight(layer: MaskedLoraLinear) -> torch.Tensor:
    return layer.base_layer.weight + layer.get_delta_weight()


# ------------------------------------------------------------------------------------------ the layer
def test_b_zero_init_leaves_output_unchanged(tiny_fresh):
    model, _ = tiny_fresh
    x = token_ids()
    with torch.no_grad():
        before = model(x).logits
    masks = _random_masks(model)
    layers = attach_lora(model, LoraConfig(rank=4), masks=masks)
    assert len(layers) == 14 and all(torch.equal(layer.mask, masks[n]) for n, layer in layers.items())
    for layer in layers.values():
        assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_B.weight.abs().sum() == 0
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    detach_lora(model)
    attach_lora(model, LoraConfig(rank=4, mask_in_training=False), masks=_random_masks(model))
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_masked_function_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.double, requires_grad=True)

    x, xl, W, b, A, B = t(2, 5, 6), t(2, 5, 6), t(4, 6), t(4), t(3, 6), t(4, 3)
    M = pack_mask(torch.rand(4, 6, generator=g) > 0.5)  # the function takes the mask's bits
    assert torch.autograd.gradcheck(lambda x, W, b, A, B: _MaskedLoraFn.apply(x, None, W, b, A, B, M, 0.7),
                                    (x, W, b, A, B))
    assert torch.autograd.gradcheck(lambda x, xl, W, b, A, B: _MaskedLoraFn.apply(x, xl, W, b, A, B, M, 0.7),
                                    (x, xl, W, b, A, B))


@pytest.mark.parametrize("view", [False, True], ids=["linear", "view"])
def test_masked_lora_forward_and_backward_stay_on_the_device_and_match_the_formula(device, view):
    """``y = x (M ⊙ W + M ⊙ s·BA)ᵀ + b`` against plain autograd, on each device; on CUDA no step waits for it."""
    g = torch.Generator().manual_seed(0)
    W, b, M = torch.randn(4, 6, generator=g), torch.randn(4, generator=g), torch.rand(4, 6, generator=g) > 0.5
    lin = nn.Linear(6, 4).to(device)
    with torch.no_grad():
        lin.weight.copy_(W if view else W * M)  # a view computes M ⊙ W itself; a copied block holds it
        lin.bias.copy_(b)
    lin.requires_grad_(False)
    base = LinearView(lin, M.to(device)) if view else lin
    layer = MaskedLoraLinear(base, rank=3, alpha=6.0, mask=M.to(device), generator=g)
    layer.set_factors(torch.randn(3, 6, generator=g), torch.randn(4, 3, generator=g))
    assert layer.bits.device.type == device.type and (layer.bits is getattr(base, "bits", None)) == view  # shared
    x = torch.randn(2, 5, 6, generator=g).to(device).requires_grad_()
    with no_host_sync(device):
        y = layer(x)  # (2, 5, 4)
        y.square().sum().backward()
    A, B = (t.detach().clone().requires_grad_() for t in (layer.lora_A.weight, layer.lora_B.weight))
    xr = x.detach().clone().requires_grad_()
    Md = M.to(device)
    ref = xr @ (W.to(device) * Md + Md * (2.0 * B @ A)).T + b.to(device)  # s = alpha / r = 2
    ref.square().sum().backward()
    pairs = [(y, ref), (x.grad, xr.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)]
    for got, want in pairs:
        assert got.device.type == device.type
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_masked_training_keeps_pruned_weights_exactly_zero(tiny_fresh):
    model, _ = tiny_fresh
    masks = _random_masks(model)
    _prune(model, masks)
    layers = attach_lora(model, LoraConfig(rank=4, alpha=8), masks=masks)
    _train_steps(model)
    x = token_ids(1, 9)
    for name, layer in layers.items():
        w = _effective_weight(layer)
        assert torch.equal(w[~masks[name]], torch.zeros_like(w[~masks[name]])), name
        assert layer.get_delta_weight()[masks[name]].abs().max() > 0, f"{name} did not train"
        # the forward pass uses exactly this effective weight
        h = torch.randn(1, 9, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(h), nn.functional.linear(h, w, layer.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model(x)  # eval forward still runs


def test_unmasked_training_moves_pruned_weights(tiny_fresh):
    model, _ = tiny_fresh
    masks = _random_masks(model)
    _prune(model, masks)
    layers = attach_lora(model, LoraConfig(rank=4, alpha=8, mask_in_training=False), masks=masks)
    assert all(layer.mask is None for layer in layers.values())
    _train_steps(model)
    for name, layer in layers.items():
        assert _effective_weight(layer)[~masks[name]].abs().max() > 0, name


def test_dropout_runs_in_training_mode(tiny_fresh):
    model, _ = tiny_fresh
    attach_lora(model, LoraConfig(rank=4, dropout=0.5), masks=_random_masks(model))
    _train_steps(model, steps=2)
    assert all(layer.get_delta_weight().abs().max() > 0 for layer in lora_modules(model).values())


def test_only_lora_factors_are_trainable_and_init_is_seeded(tiny_fresh):
    model, _ = tiny_fresh
    layers = attach_lora(model, LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]), seed=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}.weight" for n in layers for w in ("lora_A", "lora_B")}
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == ["q_proj"] * 2 + ["v_proj"] * 2
    a3 = lora_factors(model)
    detach_lora(model)
    attach_lora(model, LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]), seed=3)
    again = lora_factors(model)
    detach_lora(model)
    attach_lora(model, LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]), seed=4)
    other = lora_factors(model)
    assert all(torch.equal(a3[n][0], again[n][0]) for n in a3)
    assert not any(torch.equal(a3[n][0], other[n][0]) for n in a3)
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on (r, in=64)
    assert all(a.abs().max() <= bound for a, _ in a3.values())


def test_detach_restores_the_original_modules(tiny_fresh):
    model, _ = tiny_fresh
    originals = dict(linear_modules(model))
    weights = {n: m.weight.detach().clone() for n, m in originals.items()}
    x = token_ids()
    with torch.no_grad():
        before = model(x).logits
    attach_lora(model, LoraConfig(rank=4), masks=_random_masks(model))
    _train_steps(model, steps=2)
    names = detach_lora(model)
    assert len(names) == 14 and not lora_modules(model)
    restored = linear_modules(model)
    assert all(restored[n] is originals[n] and type(restored[n]) is nn.Linear for n in originals)
    assert all(torch.equal(restored[n].weight, weights[n]) for n in originals)
    assert all(p.requires_grad for p in model.parameters())  # flags as before attach
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_detach_with_merge_folds_the_masked_delta(tiny_fresh):
    model, _ = tiny_fresh
    masks = _random_masks(model)
    layers = attach_lora(model, LoraConfig(rank=4), masks=masks)
    _train_steps(model, steps=2)
    expected = {n: _effective_weight(layer).detach().clone() for n, layer in layers.items()}
    x = token_ids()
    with torch.no_grad():
        adapted = model(x).logits
    detach_lora(model, merge=True)
    for n, m in linear_modules(model).items():
        torch.testing.assert_close(m.weight, expected[n], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ validation
def test_wrong_mask_shape_raises_before_modifying_the_model(tiny_fresh):
    model, _ = tiny_fresh
    masks = _random_masks(model)
    masks["model.layers.1.mlp.down_proj"] = torch.ones(128, 64, dtype=torch.bool)  # transposed
    with pytest.raises(LegokitError, match=r"model\.layers\.1\.mlp\.down_proj.*\(128, 64\).*\(64, 128\)"):
        attach_lora(model, LoraConfig(rank=4), masks=masks)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_bad_masks_init_and_ranks_raise(tiny_fresh):
    model, _ = tiny_fresh
    with pytest.raises(LegokitError, match="model.layers.9.self_attn.q_proj"):
        attach_lora(model, LoraConfig(rank=4),
                    masks={"model.layers.9.self_attn.q_proj": torch.ones(64, 64) > 0})
    with pytest.raises(LegokitError, match="bool"):
        attach_lora(model, LoraConfig(rank=4), masks={"model.layers.0.self_attn.q_proj": torch.ones(64, 64)})
    with pytest.raises(LegokitError, match="not LoRA targets"):
        attach_lora(model, LoraConfig(rank=4, target_modules=["q_proj"]),
                    init={"model.layers.0.self_attn.k_proj": (torch.zeros(4, 64), torch.zeros(32, 4))})
    with pytest.raises(LegokitError, match=r"A \(4, 32\)"):
        attach_lora(model, LoraConfig(rank=4),
                    init={"model.layers.0.self_attn.k_proj": (torch.zeros(4, 32), torch.zeros(32, 4))})
    # k_proj / v_proj are 32 x 64 (GQA): rank 40 does not fit
    with pytest.raises(LegokitError, match=r"rank 40 .* = 32 of model\.layers\.0\.self_attn\.k_proj"):
        attach_lora(model, LoraConfig(rank=40))
    assert not lora_modules(model)
    attach_lora(model, LoraConfig(rank=4))
    with pytest.raises(LegokitError, match="already"):
        attach_lora(model, LoraConfig(rank=4))


def test_masks_for_non_target_modules_are_ignored(tiny_fresh):
    model, _ = tiny_fresh
    masks = _random_masks(model)
    layers = attach_lora(model, LoraConfig(rank=2, target_modules=["q_proj"]), masks=masks)
    assert sorted(layers) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert all(torch.equal(layer.mask, masks[n]) for n, layer in layers.items())


def test_init_with_another_rank_sets_rank_and_scaling(tiny_fresh):
    model, _ = tiny_fresh
    x = token_ids()
    init = random_factors(model, lambda i: 6)
    cfg = LoraConfig(rank=4, alpha=12)
    layers = attach_lora(model, cfg, init=init)
    for n, layer in layers.items():
        assert layer.r == 6 and layer.scaling == 12 / 6
        torch.testing.assert_close(layer.get_delta_weight(), delta_weight(*init[n], 2.0))
    with torch.no_grad():
        adapted = model(x).logits
    detach_lora(model)
    layers = attach_lora(model, cfg, init=init, scaling=0.5)
    assert all(layer.scaling == 0.5 and layer.lora_alpha == 3.0 for layer in layers.values())
    detach_lora(model)
    with torch.no_grad():  # manual merge of (alpha / r') B A gives the same model
        for n, m in linear_modules(model).items():
            m.weight += delta_weight(*init[n], 2.0)
        torch.testing.assert_close(model(x).logits, adapted, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ SVD
def test_svd_refactor_is_exact_at_full_rank_and_reports_energy():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 7, generator=g)
    A, B, energy = svd_refactor(delta, rank=7, scaling=0.5)
    assert A.shape == (7, 7) and B.shape == (12, 7)
    torch.testing.assert_close(0.5 * B @ A, delta, atol=1e-5, rtol=0)
    assert energy == pytest.approx(1.0)
    S = torch.linalg.svdvals(delta)
    A3, B3, e3 = svd_refactor(delta, rank=3, scaling=2.0)
    assert e3 == pytest.approx(float((S[:3] ** 2).sum() / (S ** 2).sum()), rel=1e-5)
    # best rank-3 approximation: the residual is the tail of the spectrum (Eckart-Young)
    assert torch.linalg.norm(delta - 2.0 * B3 @ A3) ** 2 == pytest.approx(float((S[3:] ** 2).sum()), rel=1e-4)
    A3l, B3l, e3l = svd_refactor(delta, rank=3, scaling=2.0, method="lowrank")
    assert e3l == pytest.approx(e3, rel=1e-3)


def test_svd_refactor_caps_rank_and_handles_zero():
    A, B, energy = svd_refactor(torch.zeros(6, 4), rank=100, scaling=1.0)
    assert A.shape == (4, 4) and B.shape == (6, 4)
    assert energy == 1.0 and torch.count_nonzero(B @ A) == 0
    with pytest.raises(LegokitError, match="rank=0"):
        svd_refactor(torch.ones(3, 3), rank=0, scaling=1.0)
    with pytest.raises(LegokitError, match="method"):
        svd_refactor(torch.ones(3, 3), rank=1, scaling=1.0, method="qr")


def test_half_precision_base_trains_float32_factors():
    model, _ = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    masks = _random_masks(model)
    layers = attach_lora(model, LoraConfig(rank=4), masks={n: m for n, m in masks.items() if "q_proj" in n})
    assert all(layer.lora_A.weight.dtype == torch.float32 for layer in layers.values())
    _train_steps(model, steps=2)
    for name, layer in layers.items():
        assert layer.get_delta_weight().abs().max() > 0, name
        if layer.mask is not None:
            assert torch.count_nonzero(layer.get_delta_weight()[~masks[name]]) == 0
    with torch.no_grad():
        assert model(token_ids()).logits.dtype == torch.bfloat16
