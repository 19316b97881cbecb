"""Benchmark building-block extraction; every ratio is measured against a baseline in the same run.

1. One-shot vs sequential calibration, Wanda and SparseGPT: extracting the levels (default 0, 25, 50,
   75%) with one dense pass vs one sequential pass per level. Time ratio (target >= 3x for Wanda) and
   the perplexity gap at 50%.
2. Perplexity of dense, magnitude, Wanda and SparseGPT blocks over the levels (one-shot blocks; target
   at 50%: SparseGPT ~ Wanda, far below magnitude).
3. A 50% structured Wanda block vs the dense model: LoRA training step time (forward + backward + AdamW
   on the adapters, both models with the same legokit LoRA, steps interleaved so load changes hit both)
   and parameter bytes, whole model and decoder only (targets: >= 1.4x faster, <= 0.65x bytes).

``--patterns unstructured,2:4,structured`` adds N:M (at N/M only; every method) and structured (magnitude and
Wanda; SparseGPT reconstructs only unstructured and N:M masks) columns to the perplexity table; ``--table-only``
skips parts 1 and 3.

    LEGOKIT_CACHE=/work/cache python bench/bench_prune.py [--n-calib 32 --seq-len 256 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from legokit.blocks import extract_blocks
from legokit.evaluate import block_perplexity
from legokit.models import DEFAULT_MODEL, decoder_layers, load_model, param_bytes
from legokit.prune import parse_pattern
from legokit.utils import peak_rss_mb


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or local checkpoint")
    p.add_argument("--levels", default="0,0.25,0.5,0.75", help="comma-separated sparsities to extract")
    p.add_argument("--n-calib", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    p.add_argument("--eval-texts", type=int, default=24, help="held-out paragraphs for perplexity")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--patterns", default="unstructured",
                   help="comma-separated patterns of the perplexity table: unstructured, N:M, structured")
    p.add_argument("--table-only", action="store_true",
                   help="only the perplexity table: no sequential calibration, no structured LoRA timing")
    p.add_argument("--train-steps", type=int, default=4, help="timed LoRA steps per model (after 1 warm-up)")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def _timed(fn):
    """``(fn(), wall seconds, CPU seconds of this process)``: on a shared machine the CPU time is the
    steadier measure, since other jobs stretch the wall time of one phase and not the other."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def decoder_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder layers' parameters (no embeddings, final norm or LM head)."""
    return sum(p.numel() * p.element_size() for p in decoder_layers(model).parameters())


def lora_step_times(models: dict[str, torch.nn.Module], batch: torch.Tensor, steps: int,
                    rank: int) -> dict[str, float]:
    """Median wall (and CPU) seconds of one LoRA training step per model; steps alternate between models."""
    from legokit.config import LoraConfig
    from legokit.lora import attach_lora, detach_lora

    cfg = LoraConfig(rank=rank, alpha=2.0 * rank)
    opts, times, cpu = {}, {k: [] for k in models}, {k: [] for k in models}
    for k, m in models.items():
        attach_lora(m, cfg, seed=0)
        m.train()
        opts[k] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    try:
        for i in range(steps + 1):  # step 0 warms up
            for k, m in models.items():
                t, c = time.perf_counter(), time.process_time()
                loss = m(input_ids=batch, labels=batch).loss
                loss.backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                if i:
                    times[k].append(time.perf_counter() - t)
                    cpu[k].append(time.process_time() - c)
    finally:
        for m in models.values():
            detach_lora(m)
            m.eval()
    return {**{k: statistics.median(v) for k, v in times.items()},
            **{f"{k}_cpu": statistics.median(v) for k, v in cpu.items()}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from legokit.data import calibration_texts, eval_texts

    levels = tuple(float(x) for x in args.levels.split(","))
    half = 0.5 if 0.5 in levels else max(levels)
    llm, tok = load_model(args.model)
    calib = calibration_texts(args.n_calib * max(1, -(-args.seq_len // 128)), seed=args.seed)
    evals = eval_texts(args.eval_texts, seed=args.seed)
    kw = dict(n_calib=args.n_calib, seq_len=args.seq_len, seed=args.seed, texts=calib, progress=False)
    res: dict = {"model": args.model, "levels": levels, "n_calib": args.n_calib, "seq_len": args.seq_len,
                 "eval_texts": args.eval_texts, "eval_seq_len": args.eval_seq_len,
                 "threads": torch.get_num_threads()}

    def ppl(block) -> float:
        return block_perplexity(block, tok, evals, seq_len=args.eval_seq_len)

    from legokit.evaluate import perplexity

    dense_ppl = perplexity(llm, tok, evals, seq_len=args.eval_seq_len)
    curve = {"dense": dense_ppl}
    calib_cmp = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        blocks, t_one, c_one = _timed(lambda m=method: extract_blocks(llm, tok, levels, method=m, **kw))
        curve[method] = {b.sparsity: (dense_ppl if b.sparsity == 0 else ppl(b)) for b in blocks}
        stored = {b.sparsity: b.nbytes() for b in blocks}
        del blocks
        print(f"{method}: one-shot {t_one:.1f}s ({c_one:.1f}s CPU), ppl {curve[method]}", flush=True)
        if method == "magnitude" or args.table_only:
            continue
        blocks, t_seq, c_seq = _timed(lambda m=method: extract_blocks(llm, tok, levels, method=m,
                                                                 calibration="sequential", **kw))
        seq_half = ppl(next(b for b in blocks if b.sparsity == half))
        del blocks
        calib_cmp[method] = {"one_shot_s": t_one, "sequential_s": t_seq, "speedup": t_seq / t_one,
                             "one_shot_cpu_s": c_one, "sequential_cpu_s": c_seq, "cpu_speedup": c_seq / c_one,
                             "ppl_half_one_shot": curve[method][half], "ppl_half_sequential": seq_half,
                             "ppl_gap": curve[method][half] - seq_half, "stored_bytes": stored}
        print(f"{method}: sequential {t_seq:.1f}s ({c_seq:.1f}s CPU), ppl at {half:g}: {seq_half:.2f}",
              flush=True)
    for pattern in (p for p in args.patterns.split(",") if p != "unstructured"):
        pat = parse_pattern(pattern)
        at = tuple(s for s in levels if pat.kind == "structured" or s in (0, pat.implied_sparsity))
        for method in ("magnitude", "wanda") + (() if pat.kind == "structured" else ("sparsegpt",)):
            blocks, t, _ = _timed(lambda m=method, a=at, p=pattern: extract_blocks(llm, tok, a, method=m,
                                                                                           pattern=p, **kw))
            curve[f"{method} {pattern}"] = {b.sparsity: (dense_ppl if b.sparsity == 0 else ppl(b)) for b in blocks}
            del blocks
            print(f"{method} {pattern}: {t:.1f}s, ppl {curve[f'{method} {pattern}']}", flush=True)
    res["calibration"] = calib_cmp
    res["perplexity"] = curve
    res["peak_rss_mb"] = peak_rss_mb()
    res["llm_fp32_mb"] = param_bytes(llm) / 2**20
    if args.table_only:
        report(res)
        return _dump(res, args.json)

    dense_b, struct_b = extract_blocks(llm, tok, (0.0, 0.5), method="wanda", pattern="structured", **kw)
    dense_m, slm = dense_b.model, struct_b.model
    gen = torch.Generator().manual_seed(args.seed)
    stream = tok("\n".join(evals), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    need = args.train_batch * args.train_seq_len
    if len(stream) < need:
        stream = stream.repeat(need // len(stream) + 1)
    start = int(torch.randint(0, len(stream) - need + 1, (1,), generator=gen))
    batch = stream[start:start + need].reshape(args.train_batch, args.train_seq_len)
    sizes = {"dense_bytes": param_bytes(dense_m), "slm_bytes": param_bytes(slm),
             "dense_decoder_bytes": decoder_bytes(dense_m), "slm_decoder_bytes": decoder_bytes(slm)}
    steps = lora_step_times({"dense": dense_m, "structured": slm}, batch, args.train_steps, args.lora_rank)
    res["structured"] = {
        "config": {"heads": slm.config.num_attention_heads, "kv_heads": slm.config.num_key_value_heads,
                   "intermediate": slm.config.intermediate_size},
        "step_s_dense": steps["dense"], "step_s_structured": steps["structured"],
        "step_speedup": steps["dense"] / steps["structured"],
        "step_cpu_speedup": steps["dense_cpu"] / steps["structured_cpu"],
        "bytes_ratio": sizes["slm_bytes"] / sizes["dense_bytes"],
        "decoder_bytes_ratio": sizes["slm_decoder_bytes"] / sizes["dense_decoder_bytes"],
        "ppl_structured_50": ppl(struct_b), **sizes}
    dense_b.release()
    struct_b.release()
    res["peak_rss_mb"] = peak_rss_mb()
    report(res)
    return _dump(res, args.json)


def _dump(res: dict, path: str | None) -> dict:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return res


def report(res: dict) -> None:
    levels = res["levels"]
    print(f"\n== one-shot vs sequential calibration ({len(levels)} levels: {', '.join(map(str, levels))}; "
          f"{res['n_calib']} x {res['seq_len']} tokens) ==")
    print(f"{'method':10s}{'one-shot s':>12s}{'sequential s':>14s}{'speedup':>9s}{'CPU speedup':>13s}"
          f"{'ppl50 one-shot':>16s}{'ppl50 seq':>11s}")
    for m, r in res["calibration"].items():
        print(f"{m:10s}{r['one_shot_s']:12.1f}{r['sequential_s']:14.1f}{r['speedup']:8.2f}x"
              f"{r['cpu_speedup']:12.2f}x{r['ppl_half_one_shot']:16.2f}{r['ppl_half_sequential']:11.2f}")
    print(f"\n== perplexity ({res['eval_texts']} held-out paragraphs, seq_len {res['eval_seq_len']}; "
          f"dense {res['perplexity']['dense']:.2f}) ==")
    methods = [m for m in res["perplexity"] if m != "dense"]
    print(f"{'sparsity':>9s}" + "".join(f"{m:>22s}" for m in methods))
    for s in levels:
        print(f"{s:9.2f}" + "".join(f"{res['perplexity'][m][s]:22.2f}" if s in res["perplexity"][m] else f"{'-':>22s}"
                                    for m in methods))
    if "structured" not in res:
        print(f"\npeak RSS {res['peak_rss_mb']:.0f} MiB (LLM fp32 {res['llm_fp32_mb']:.0f} MiB)")
        return
    st = res["structured"]
    print(f"\n== 50% structured Wanda block vs dense ({st['config']}) ==")
    print(f"LoRA step: dense {st['step_s_dense']:.2f}s, structured {st['step_s_structured']:.2f}s -> "
          f"{st['step_speedup']:.2f}x faster ({st['step_cpu_speedup']:.2f}x in CPU time)")
    print(f"parameter bytes: {st['bytes_ratio']:.3f}x of dense (decoder only "
          f"{st['decoder_bytes_ratio']:.3f}x); perplexity {st['ppl_structured_50']:.2f}")
    print(f"\npeak RSS {res['peak_rss_mb']:.0f} MiB (LLM fp32 {res['llm_fp32_mb']:.0f} MiB); "
          f"{res['threads']} torch threads")


if __name__ == "__main__":
    main()
