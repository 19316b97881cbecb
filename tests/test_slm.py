"""legokit.slm: an SLM as views of the LLM's weights (forward and backward equal a copied block's), the packed
masks the views and masked LoRA share, and what a built view refuses."""

import numpy as np
import pytest
import torch
from helpers import lora_forward_backward, river_paragraphs, token_ids

from legokit.analysis import apply_delta
from legokit.blocks import extract_blocks
from legokit.config import LoraConfig
from legokit.lora import attach_lora, detach_lora, lora_modules
from legokit.slm import LinearView, _pack_bits, _unpack_bits, build_slm, materialize, pack_mask, unpack_mask
from legokit.utils import LegokitError

KW = dict(n_calib=4, seq_len=32, texts=river_paragraphs(24), progress=False)


@pytest.fixture(scope="module")
def ids():
    return token_ids(2, 12, seed=0)


@pytest.mark.parametrize("shape", [(7, 13), (4, 8), (1, 1)])
def test_pack_mask_round_trip_stays_on_the_device(device, shape):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    p = pack_mask(m.to(device))
    assert p.device.type == device.type and p.dtype == torch.uint8 and p.numel() == -(-m.numel() // 8)
    assert torch.equal(p.cpu(), torch.from_numpy(np.packbits(m.numpy().reshape(-1))))  # the stored format
    back = unpack_mask(p, shape)
    assert back.device.type == device.type and back.dtype == torch.bool and torch.equal(back.cpu(), m)


def test_the_torch_bit_operations_give_numpys_bytes():
    """The off-CPU path (torch bit operations), run on the CPU: the same bytes as numpy's packbits, first bit
    high and the last byte zero-padded, and back."""
    for shape in [(7, 13), (3, 16), (1, 1), (64, 9)]:
        m = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.3
        ref = np.packbits(m.numpy().reshape(-1))
        assert np.array_equal(_pack_bits(m).numpy(), ref)
        assert torch.equal(_unpack_bits(torch.from_numpy(ref), m.numel()).view(shape), m)
    assert _pack_bits(torch.tensor([True] + [False] * 8)).tolist() == [128, 0]


# ----- views: a block computes with the LLM's weights ------------------------------------------------------
@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("magnitude", "2:4"),
                                            ("sparsegpt", "unstructured"), ("wanda", "structured"),
                                            ("wanda", "unstructured-dense")])
def test_a_view_block_computes_what_the_copied_block_computes(tiny, ids, method, pattern):
    """Forward (logits, loss) and backward (every LoRA gradient) of a view block equal the copied block's."""
    llm, tok = tiny
    s = 0.0 if pattern.endswith("dense") else 0.5
    b = extract_blocks(llm, tok, (s,), method=method, pattern=pattern.split("-")[0], **KW)[0]
    view, copied = build_slm(b, view=True), build_slm(b, view=False)
    name = "model.layers.1.mlp.down_proj"
    assert isinstance(view.get_submodule(name), LinearView) is (not b.structured)
    assert not isinstance(copied.get_submodule(name), LinearView)
    assert torch.equal(view.get_submodule(name).weight, copied.get_submodule(name).weight)
    if not b.structured:  # the view stores no weight of its own: the SLM's state has none of the linear layers
        assert f"{name}.weight" not in view.state_dict() and f"{name}.weight" in copied.state_dict()
    lora_cfg = LoraConfig(rank=2, alpha=4.0)
    got = lora_forward_backward(view, ids, b.local_masks, lora_cfg)
    want = lora_forward_backward(copied, ids, b.local_masks, lora_cfg)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    assert set(got[2]) == set(want[2]) and len(got[2]) == 2 * len(b.shapes)  # every LoRA factor has a gradient
    for n in got[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-5, atol=1e-7, msg=n)
    assert all(p.grad is None for p in llm.parameters())  # the LLM's weights are read, never trained


def test_a_built_view_follows_the_llm_and_refuses_in_place_edits(tiny_fresh):
    llm, tok = tiny_fresh
    b = extract_blocks(llm, tok, (0.5,), method="wanda", **KW)[0]
    name = "model.layers.0.self_attn.q_proj"
    live = b.model
    with torch.no_grad():
        llm.get_submodule(name).weight.mul_(2)  # the LLM changed in place: the live view sees it (documented)
    assert torch.equal(live.get_submodule(name).weight, llm.get_submodule(name).weight * b.masks[name])
    with pytest.raises(LegokitError, match="materialize"):
        with apply_delta(live, {name: torch.zeros(b.shapes[name])}):
            pass
    attach_lora(live, LoraConfig(rank=2), masks=b.local_masks)
    with pytest.raises(LegokitError, match="materialize"):
        detach_lora(live, merge=True)
    materialize(live)
    assert not any(isinstance(m, LinearView) for m in live.modules())
    assert f"{name}.base_layer.weight" in live.state_dict()
    detach_lora(live, merge=True)  # now a plain layer that holds its weight
    with pytest.raises(LegokitError, match=r"bool of the LLM module's shape"):
        LinearView(llm.get_submodule(name), b.masks[name][:3])
    with pytest.raises(LegokitError, match=r"uint8 of \d+ bytes"):
        LinearView(llm.get_submodule(name), bits=b.masks.packed[name][:3])


def test_views_and_masked_lora_hold_the_mask_as_the_blocks_own_bits(tiny):
    """No bool per weight while a block is built and trained: its views share the block's packed masks and each
    masked LoRA layer holds the mask as bits (1/8 of a bool mask)."""
    llm, tok = tiny
    b = extract_blocks(llm, tok, (0.5,), method="wanda", **KW)[0]
    model = b.model
    views = {n: m for n, m in model.named_modules() if isinstance(m, LinearView)}
    assert set(views) == set(b.shapes)
    for n, v in views.items():
        assert v.bits.data_ptr() == b.masks.packed[n].data_ptr(), n  # shared, not copied
        assert torch.equal(v.mask, b.masks[n])
    assert not any(t.dtype == torch.bool for t in model.buffers())
    layers = attach_lora(model, LoraConfig(rank=2), masks=b.local_masks)
    for n, layer in layers.items():
        assert layer.bits.dtype == torch.uint8 and layer.bits.numel() == -(-b.masks[n].numel() // 8), n
        assert torch.equal(layer.mask, b.masks[n]), n
    assert not any(t.dtype == torch.bool for t in model.buffers())
    detach_lora(model)
    b.release()


def test_masked_lora_on_a_view_shares_its_mask_and_folds_the_weights_exactly(tiny, ids):
    """Under the view's own mask the LoRA layer computes M ⊙ (W + sΔ) in one pass; forward and backward equal the
    copied block's unfolded M ⊙ W + M ⊙ sΔ to the last bit."""
    llm, tok = tiny
    b = extract_blocks(llm, tok, (0.5,), method="wanda", **KW)[0]
    cfg = LoraConfig(rank=2, alpha=4.0)
    view = build_slm(b, view=True)
    folded = lora_forward_backward(view, ids, b.local_masks, cfg)
    assert all(layer.bits is layer.base_layer.bits for layer in lora_modules(view).values())  # shared, folded
    plain = lora_forward_backward(build_slm(b, view=False), ids, b.local_masks, cfg)
    assert torch.equal(folded[0], plain[0]) and torch.equal(folded[1], plain[1])
    assert set(folded[2]) == set(plain[2])
    for n in folded[2]:
        assert torch.equal(folded[2][n], plain[2][n]), n
