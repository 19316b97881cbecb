"""The scorer's throughput on the default LLM: legokit's packed scorer against a plain Hugging Face forward loop
over the same items, and against the machine's 2·N FLOP/token limit (N = non-embedding parameters, the GEMM rate
measured in the same run).

    python bench/bench_eval.py [--n 100] [--tasks piqa mmlu boolq commonsense_qa] [--scoring harness]

Tokens are counted as the scorer lays them out (a prefix shared by the options once, each option's tokens but
its last); the plain loop runs one unpadded forward per (item, option) with full logits, as a first script
would. Both produce the same log-likelihoods (the largest difference is printed).
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import gemm_gflops

from legokit.data import choice_ids, harness_requests, load_task, tokenize_example
from legokit.likelihood import _layout, score_requests
from legokit.models import load_model


def non_embedding_params(model) -> int:
    emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def plain_loop(model, requests) -> list[list[float]]:
    out = []
    for prefix, conts in requests:
        row = []
        for cont in conts:
            logits = model(torch.tensor([prefix + cont])).logits[0]  # (T, V): every position's logits
            logp = torch.log_softmax(logits.float(), -1)
            row.append(sum(logp[len(prefix) - 1 + t, c].item() for t, c in enumerate(cont)))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="test items per task")
    ap.add_argument("--tasks", nargs="+", default=["piqa", "mmlu", "boolq", "commonsense_qa"])
    ap.add_argument("--scoring", default="harness", choices=["harness", "label"])
    ap.add_argument("--plain-n", type=int, default=30, help="items per task for the (slow) plain loop")
    ap.add_argument("--row-tokens", type=int, default=384, help="the scorer's packed row length")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model()
    model.eval()
    n_params = non_embedding_params(model)
    gflops = gemm_gflops()
    limit = gflops * 1e9 / (2 * n_params)  # tokens/s if every FLOP were a GEMM at the measured rate
    print(f"GEMM fp32: {gflops:.1f} GFLOP/s; N = {n_params / 1e6:.1f} M non-embedding parameters; "
          f"2N limit = {limit:.0f} tokens/s; torch threads {torch.get_num_threads()}")
    print(f"{'task':16s}{'items':>6s}{'tokens':>8s}{'tok/s':>8s}{'of limit':>10s}{'plain it/s':>11s}"
          f"{'ours it/s':>10s}{'speedup':>9s}{'max|d|':>9s}")
    for task in args.tasks:
        examples = load_task(task, "test")[: args.n]
        if args.scoring == "harness":
            requests = [harness_requests(ex, tok) for ex in examples]
        else:
            requests = []
            for ex in examples:
                p, r = tokenize_example(ex, tok)
                requests.append((p, [r, *choice_ids(ex, tok)]))
        tokens = sum(len(_layout(r)[0]) for r in requests)
        with torch.inference_mode():
            score_requests(model, requests[:8], row_tokens=args.row_tokens)  # warm-up
            t = time.perf_counter()
            ours = score_requests(model, requests, row_tokens=args.row_tokens)
            dt = time.perf_counter() - t
            k = min(args.plain_n, len(requests))
            t = time.perf_counter()
            ref = plain_loop(model, requests[:k])
            dt_plain = time.perf_counter() - t
        diff = max(abs(a - b) for ra, rb in zip(ours[:k], ref, strict=True) for a, b in zip(ra, rb, strict=True))
        tps = tokens / dt
        print(f"{task:16s}{len(requests):6d}{tokens:8d}{tps:8.0f}{tps / limit:10.2f}{k / dt_plain:11.2f}"
              f"{len(requests) / dt:10.2f}{(len(requests) / dt) / (k / dt_plain):9.2f}{diff:9.1e}")


if __name__ == "__main__":
    main()
