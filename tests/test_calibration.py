"""Calibration windows, input-statistics hooks and the layer-by-layer pass on tiny-llama."""

from __future__ import annotations

import copy

import pytest
import torch

from legokit.calibration import InputStats, calibration_inputs, layerwise_calibration
from legokit.models import decoder_layers, linear_modules
from legokit.prune import apply_masks
from legokit.utils import LegokitError

TEXTS = [f"Paragraph {i}: the river Avon flows past mill number {i * 7} towards the old stone bridge." * 3
         for i in range(24)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- calibration ------------------------------------------------------------------------------------------
def test_calibration_inputs_windows(tiny):
    _, tok = tiny
    ids = calibration_inputs(tok, TEXTS, n_calib=4, seq_len=32, seed=0)
    assert ids.shape == (4, 32) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_inputs(tok, TEXTS, 4, 32, seed=0))
    # the windows are consecutive, non-overlapping pieces of the texts joined by EOS
    stream = [t for ids_ in tok(TEXTS, add_special_tokens=False)["input_ids"] for t in ids_ + [tok.eos_token_id]]
    flat = ids.reshape(-1).tolist()
    starts = [i for i in range(len(stream) - len(flat) + 1) if stream[i:i + len(flat)] == flat]
    assert starts, "the windows are not one consecutive stretch of the token stream"
    # 8 bytes and the EOS that ends each text: fewer than seq_len tokens give one shorter window, all of them
    short = calibration_inputs(tok, ["hi there"], n_calib=4, seq_len=32)
    assert short.tolist() == [tok("hi there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert short.shape == (1, 9)
    with pytest.raises(LegokitError, match="no calibration text"):
        calibration_inputs(tok, [], 4, 32)
    with pytest.raises(LegokitError, match="no calibration text"):
        calibration_inputs(tok, ["", "  "], 4, 32)


def test_input_stats_share_inputs_and_remove_their_hooks(tiny):
    llm, tok = tiny
    layer = decoder_layers(llm)[0]
    mods = linear_modules(layer)
    x = torch.randn(2, 5, 64, generator=_gen(8))
    seen = {}
    handle = mods["self_attn.q_proj"].register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    with InputStats(mods, norms=True, hessians=True) as stats:
        llm.model.layers[0](x, position_embeddings=llm.model.rotary_emb(x, torch.arange(5)[None]))
    handle.remove()
    assert all(not m._forward_hooks for m in mods.values())
    assert stats.shared("self_attn.k_proj") == stats.shared("self_attn.q_proj")
    assert stats.shared("mlp.up_proj") == stats.shared("mlp.gate_proj")
    assert stats.shared("mlp.down_proj") != stats.shared("mlp.gate_proj")
    xi = seen["x"].reshape(-1, 64)
    assert torch.allclose(stats.act_norm("self_attn.v_proj"), xi.norm(dim=0), rtol=1e-5)
    h = 2 * xi.T @ xi / xi.shape[0]
    assert torch.allclose(stats.hessian("self_attn.q_proj"), h, rtol=1e-4, atol=1e-6)


def test_sequential_calibration_feeds_pruned_outputs_and_leaves_the_llm_alone(tiny):
    llm, tok = tiny
    ids = calibration_inputs(tok, TEXTS, n_calib=2, seq_len=32)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    norms = {}

    def on_layer(i, layer, stats):
        names = [n for n in linear_modules(llm) if n.startswith(f"model.layers.{i}.")]
        norms[i] = stats.act_norm(f"model.layers.{i}.mlp.gate_proj")
        if i == 0:  # prune layer 0 to zero: layer 1 must then see the residual stream only
            return {n: torch.zeros_like(llm.get_submodule(n).weight) for n in names}
        return None

    layerwise_calibration(llm, ids, on_layer, norms=True, batch_size=1)
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())
    # reference: a copy with layer 0's linear layers zeroed, statistics from one full forward
    ref = copy.deepcopy(llm)
    apply_masks(ref, {n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in linear_modules(ref).items()
                      if n.startswith("model.layers.0.")})
    with InputStats({"g": ref.get_submodule("model.layers.1.mlp.gate_proj")}) as st, torch.no_grad():
        ref(ids, use_cache=False)
    assert torch.allclose(norms[1], st.act_norm("g"), rtol=1e-4)
