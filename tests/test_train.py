"""Local client training: packed batches, response-only loss, seeding, failure messages (tiny-llama)."""

from __future__ import annotations

import math

import pytest
import torch

from legokit.config import LoraConfig, TrainConfig
from legokit.data import Example, encode
from legokit.lora import attach_lora, lora_factors, lora_modules
from legokit.models import linear_modules, load_model
from legokit.train import (
    TrainResult,
    adamw,
    batch_loss,
    batch_order,
    make_batch,
    packed_attention,
    train_client,
)
from legokit.utils import LegokitError

EXAMPLES = [
    Example(task="boolq", prompt="Is the sky blue on a clear day?", response="yes"),
    Example(task="boolq", prompt="Do fish breathe with lungs?", response="no"),
    Example(task="nq_open", prompt="What is the capital of France?", response="Paris"),
]


def _seqs(lengths_prompts, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, n_prompt in lengths_prompts:
        ids = torch.randint(3, 259, (length,), generator=g).tolist()
        out.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    return out


# ------------------------------------------------------------------------------------------ batching
def test_packed_loss_equals_per_sequence_and_padded_loss(tiny_fresh):
    model, tok = tiny_fresh
    seqs = _seqs([(10, 4), (23, 9), (5, 2), (14, 13)])
    with torch.no_grad():
        packed, n_packed = batch_loss(model, make_batch(seqs, tok.pad_token_id, pack=True))  # sdpa + mask
        padded, n_padded = batch_loss(model, make_batch(seqs, tok.pad_token_id, pack=False))
        per_seq = [batch_loss(model, make_batch([s], tok.pad_token_id)) for s in seqs]
        with packed_attention(model) as switched:  # per-sequence sdpa from cu_seq_lens
            assert switched and model.config._attn_implementation == "legokit_varlen_sdpa"
            varlen, _ = batch_loss(model, make_batch(seqs, tok.pad_token_id, pack=True))
    assert model.config._attn_implementation == "sdpa"
    total = sum(loss * n for loss, n in per_seq) / sum(n for _, n in per_seq)
    assert n_packed == n_padded == sum(n for _, n in per_seq) == 6 + 14 + 3 + 1
    torch.testing.assert_close(packed, total, atol=1e-5, rtol=0)
    torch.testing.assert_close(varlen, total, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, total, atol=1e-5, rtol=0)
    # the check can fail: without restarting positions the sequences attend to each other
    batch = make_batch(seqs, tok.pad_token_id, pack=True)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    with torch.no_grad():
        leaky, _ = batch_loss(model, batch)
    assert (leaky - total).abs() > 1e-3


def test_packed_gradients_equal_per_sequence_gradients(tiny_fresh):
    model, tok = tiny_fresh
    attach_lora(model, LoraConfig(rank=2, target_modules=["q_proj", "down_proj"]), seed=1)
    with torch.no_grad():  # nonzero B so that A gets gradients too
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    seqs = _seqs([(12, 5), (7, 3), (16, 8)], seed=2)
    with packed_attention(model):
        loss, _ = batch_loss(model, make_batch(seqs, tok.pad_token_id))
        packed = torch.autograd.grad(loss, params)
    sums = [torch.zeros_like(p) for p in params]
    n_total = 0
    for s in seqs:
        loss_s, n = batch_loss(model, make_batch([s], tok.pad_token_id))
        for acc, g in zip(sums, torch.autograd.grad(loss_s * n, params), strict=True):
            acc += g
        n_total += n
    for g, acc in zip(packed, sums, strict=True):
        torch.testing.assert_close(g, acc / n_total, atol=1e-6, rtol=1e-4)


def test_varlen_attention_refuses_unpacked_input(tiny_fresh):
    model, tok = tiny_fresh
    with packed_attention(model), pytest.raises(LegokitError, match="cu_seq_lens"), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert model.config._attn_implementation == "sdpa"


def test_make_batch_shifts_targets_per_sequence():
    seqs = [([5, 6, 7], [-100, 6, 7]), ([8, 9], [8, 9])]
    b = make_batch(seqs, pad_id=0, pack=True)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["targets"].tolist() == [[6, 7, -100, 9, -100]]  # token 7 never predicts token 8
    p = make_batch(seqs, pad_id=0, pack=False)
    assert p["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert p["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert p["targets"].tolist() == [[6, 7, -100], [9, -100, -100]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5] and b["max_length_q"] == 3 and "cu_seq_lens_q" not in p


# ------------------------------------------------------------------------------------------ training
def test_training_reduces_the_loss_and_touches_only_lora(tiny_fresh):
    model, tok = tiny_fresh
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach_lora(model, LoraConfig(rank=8, alpha=16))
    cfg = TrainConfig(local_steps=20, batch_size=3, lr=1e-2, max_len=128)
    res = train_client(model, tok, EXAMPLES[:2], cfg, seed=0, progress=False)
    assert isinstance(res, TrainResult) and res.steps == 20 and len(res.losses) == 20
    # the random tiny model's frozen tied embeddings (std 0.02) bound the logits: the loss starts at
    # ln(259) ~ 5.6 and cannot go far below ~4.5, so ask for a clear drop rather than a ratio
    assert sum(res.losses[-3:]) / 3 < res.losses[0] - 0.5
    assert not model.training and model.config._attn_implementation == "sdpa"  # modes restored
    # every step's batch is the seeded order's examples: count its tokens and (shifted) response targets
    encoded = [encode(e, tok, 128) for e in EXAMPLES[:2]]
    order = batch_order(2, 20, 3, seed=0)
    assert res.tokens == sum(len(encoded[i][0]) for b in order for i in b)
    assert res.response_tokens == sum(sum(t != -100 for t in encoded[i][1][1:]) for b in order for i in b)
    assert res.num_examples == 2
    assert res.tokens_per_second / res.response_tokens_per_second == pytest.approx(res.tokens / res.response_tokens)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n


def test_same_seed_gives_bit_identical_factors(tiny):
    _, tok = tiny
    cfg = TrainConfig(local_steps=4, batch_size=2, lr=5e-3, max_len=96)
    lcfg = LoraConfig(rank=4, dropout=0.1)

    def run(seed: int):
        m, _ = load_model("tiny-llama", device="cpu")
        attach_lora(m, lcfg, seed=0)
        res = train_client(m, tok, EXAMPLES, cfg, seed=seed, progress=False)
        return lora_factors(m), res.losses

    (f1, l1), (f2, l2), (f3, _) = run(7), run(7), run(8)
    assert l1 == l2
    assert all(torch.equal(f1[n][0], f2[n][0]) and torch.equal(f1[n][1], f2[n][1]) for n in f1)
    assert not all(torch.equal(f1[n][1], f3[n][1]) for n in f1)


def test_packing_off_trains_the_same(tiny):
    _, tok = tiny
    cfg = TrainConfig(local_steps=3, batch_size=3, lr=5e-3, max_len=96)
    out = []
    for pack in (True, False):
        m, _ = load_model("tiny-llama", device="cpu")
        attach_lora(m, LoraConfig(rank=4), seed=0)
        res = train_client(m, tok, EXAMPLES, cfg, seed=0, progress=False, pack=pack)
        out.append((res.losses, lora_factors(m)))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-5)
    for n, (_, b) in out[0][1].items():
        torch.testing.assert_close(b, out[1][1][n][1], atol=1e-5, rtol=1e-3)


def test_nan_loss_names_client_round_and_step(tiny_fresh):
    model, tok = tiny_fresh
    attach_lora(model, LoraConfig(rank=4))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.base_layer.weight[0, 0] = float("nan")
    cfg = TrainConfig(local_steps=3, batch_size=2, max_len=96)
    with pytest.raises(LegokitError, match=r"client 'alice', round 3, step 0: the loss is nan"):
        train_client(model, tok, EXAMPLES, cfg, seed=0, client="alice", round_idx=3, progress=False)
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert all(p.grad is None for p in model.parameters())


def test_diverging_training_is_caught_at_the_step_it_happens(tiny_fresh):
    model, tok = tiny_fresh
    attach_lora(model, LoraConfig(rank=4))
    cfg = TrainConfig(local_steps=5, batch_size=2, lr=1e30, max_len=96)  # one update blows the model up
    with pytest.raises(LegokitError, match=r"client 'bob', round 1, step 1: the loss is nan"):
        train_client(model, tok, EXAMPLES, cfg, seed=0, client="bob", round_idx=1, progress=False)
    model, _ = load_model("tiny-llama", device="cpu")
    attach_lora(model, LoraConfig(rank=4))
    with torch.no_grad():  # a finite loss whose gradient overflows
        model.model.layers[0].self_attn.q_proj.lora_B.weight.fill_(1e30)
    with pytest.raises(LegokitError, match=r"client 'bob', round 2, step 0: the gradient norm is inf"):
        train_client(model, tok, EXAMPLES, cfg, seed=0, client="bob", round_idx=2, progress=False)


def test_empty_examples_and_nothing_trainable_raise(tiny_fresh):
    model, tok = tiny_fresh
    with pytest.raises(LegokitError, match="client 'carol' has no training examples"):
        train_client(model, tok, [], TrainConfig(), seed=0, client="carol", progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(LegokitError, match="attach_lora"):
        train_client(model, tok, EXAMPLES, TrainConfig(), seed=0, progress=False)


def test_gradient_checkpointing_trains_the_same(tiny):
    _, tok = tiny
    out = []
    for ckpt in (False, True):
        cfg = TrainConfig(local_steps=3, batch_size=3, lr=5e-3, max_len=96, gradient_checkpointing=ckpt)
        m, _ = load_model("tiny-llama", device="cpu")
        attach_lora(m, LoraConfig(rank=4), seed=0)
        res = train_client(m, tok, EXAMPLES, cfg, seed=0, progress=False)
        assert not m.is_gradient_checkpointing  # switched off again after training
        out.append((res.losses, lora_factors(m)))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-6)
    for n, (a, b) in out[0][1].items():
        torch.testing.assert_close(a, out[1][1][n][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b, out[1][1][n][1], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ devices, precision
def _masks(model, keep: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(m.weight.shape, generator=g) < keep for n, m in linear_modules(model).items()}


def test_a_train_step_on_the_device_matches_the_cpu(tiny, device):
    """Masked LoRA, packed varlen attention and AdamW on each device: the factors stay there, the losses and the
    factors agree with the CPU's."""
    _, tok = tiny
    cfg = TrainConfig(local_steps=1, batch_size=3, lr=5e-3, max_len=96)
    out = {}
    for dev in dict.fromkeys([torch.device("cpu"), device]):
        model, _ = load_model("tiny-llama", device=str(dev), dtype="float32")
        attach_lora(model, LoraConfig(rank=4), masks=_masks(model), seed=0)
        res = train_client(model, tok, EXAMPLES, cfg, seed=0, progress=False)
        trained = [p for p in model.parameters() if p.requires_grad]
        assert trained and all(p.device.type == dev.type for p in trained)
        out[dev.type] = res.losses, lora_factors(model)
    (loss_cpu, f_cpu), (loss_dev, f_dev) = out["cpu"], out[device.type]
    assert all(math.isfinite(v) for v in loss_dev) and loss_dev == pytest.approx(loss_cpu, abs=1e-4)
    for n, (a, b) in f_cpu.items():
        torch.testing.assert_close(f_dev[n][0], a, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(f_dev[n][1], b, atol=1e-4, rtol=1e-3)


def test_a_bfloat16_base_trains_float32_factors_with_float32_optimizer_state(tiny):
    """The usual mixed precision (a bfloat16 base on CUDA), run on the CPU: float32 factors, float32 AdamW moments,
    a finite loss; a half-precision trainable parameter is refused."""
    _, tok = tiny
    model, _ = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    masks = _masks(model)
    attach_lora(model, LoraConfig(rank=4), masks=masks, seed=0)
    cfg = TrainConfig(local_steps=1, batch_size=2, lr=5e-3, max_len=96)
    res = train_client(model, tok, EXAMPLES, cfg, seed=0, progress=False)
    assert res.steps == 1 and all(math.isfinite(v) for v in res.losses)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in lora_modules(model).values())
    opt = adamw(params, cfg)  # train_client's optimizer, stepped once more to look at its state
    seqs = [encode(e, tok, cfg.max_len, cfg.format) for e in EXAMPLES]
    with packed_attention(model):
        loss, _ = batch_loss(model, make_batch(seqs, tok.pad_token_id))
    loss.backward()
    opt.step()
    moments = [t for st in opt.state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(params) and all(t.dtype == torch.float32 for t in moments)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    with pytest.raises(LegokitError, match="torch.bfloat16: train float32 LoRA factors"):
        adamw([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], cfg)
