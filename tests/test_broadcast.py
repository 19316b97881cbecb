"""The broadcasts in the loop (tiny-llama): the global adapter in peft format, local adapters that share nothing,
FlexLoRA at the client rank, a full-rank adapter equal to merging."""

import json

import pytest
import torch
from helpers import PARTS, aggregated, fresh_setup, global_delta, make_examples, run_tiny, tiny_config

from legokit.broadcast import load_uniform_adapter
from legokit.client import local_update
from legokit.federation import run_federation
from legokit.models import load_model


def test_global_adapter_loads_with_peft(setup_llm, tmp_path):
    from peft import PeftModel

    llm, tok, blocks = setup_llm
    server = run_tiny(tiny_config(fed={"rounds": 1}), llm, tok, blocks, PARTS, tmp_path)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    ref, _ = load_model("tiny-llama", device="cpu")
    with torch.no_grad():
        for name, delta in global_delta(server).items():
            ref.get_submodule(name).weight += delta
        want = ref(ids).logits
    fresh, _ = load_model("tiny-llama", device="cpu")
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "adapters" / "round_001")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, want, atol=1e-5, rtol=1e-4)


def test_local_mode_keeps_one_adapter_per_client_and_shares_nothing(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    run_federation(tiny_config(fed={"aggregator": "local"}), llm, tok, blocks, PARTS, tmp_path / "a", progress=False)
    # the same run with other data at client 1: nothing of client 1 may reach client 0
    other = [PARTS[0], make_examples("piqa", 4)]
    run_federation(tiny_config(fed={"aggregator": "local"}), llm, tok, blocks, other, tmp_path / "b", progress=False)

    def adapter(run: str, rnd: int, client: int) -> dict:
        return load_uniform_adapter(tmp_path / run / "adapters" / f"round_{rnd:03d}" / f"client_{client}")[0]

    a0, b0, a1, b1 = adapter("a", 2, 0), adapter("b", 2, 0), adapter("a", 2, 1), adapter("b", 2, 1)
    assert sorted(a0) == sorted(a1) and len(a0) == 14
    for name in a0:
        assert torch.equal(a0[name][0], b0[name][0]) and torch.equal(a0[name][1], b0[name][1]), name
    assert not all(torch.equal(a1[n][1], b1[n][1]) for n in a1)  # client 1's own data does matter
    # round 2 went on from the client's own round-1 adapter
    first, scaling = load_uniform_adapter(tmp_path / "a" / "adapters" / "round_001" / "client_0")
    again = local_update(tiny_config(fed={"aggregator": "local"}), blocks[0], tok, PARTS[0], first, scaling,
                         client=0, rnd=2, progress=False)
    for name, (a, b) in again.factors.items():
        torch.testing.assert_close(a, a0[name][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(b, a0[name][1], atol=1e-6, rtol=0)


def test_flexlora_broadcasts_the_client_rank_and_heteagg_the_global_rank(setup_llm):
    counts = (1, 3)
    flex = aggregated(setup_llm, counts, aggregator="flexlora")
    hete = aggregated(setup_llm, counts)
    r, alpha = flex.cfg.lora.rank, flex.cfg.lora.alpha
    assert flex.broadcast.scaling == alpha / r and hete.broadcast.scaling == alpha / (2 * r)
    for k in range(2):  # every client starts the next round at its own rank r
        factors, scaling = flex.start_state(k)
        assert scaling == alpha / r
        assert all(a.shape[0] == b.shape[1] == r for a, b in factors.values())
    assert all(a.shape[0] == 2 * r for a, _ in hete.broadcast.factors.values())
    # FlexLoRA's broadcast is the best rank-r approximation of Σ p_k s_k B_k A_k (Eckart-Young)
    final = global_delta(flex)
    p = [n / sum(counts) for n in counts]
    for name in flex.modules:
        dense = sum(pk * res.scaling * (res.factors[name][1] @ res.factors[name][0])
                    for pk, res in zip(p, flex.last_results, strict=True))
        s2 = torch.linalg.svdvals(dense.double()) ** 2
        assert float((final[name] - dense).double().square().sum()) == pytest.approx(float(s2[r:].sum()), rel=1e-3)


def test_full_rank_adapter_broadcast_equals_merge_after_one_round(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    # global_rank 64 = min(out, in) of every module (64 x 64, 32 x 64, 128 x 64, 64 x 128): nothing is cut
    adapter = run_tiny(tiny_config(fed={"rounds": 1, "global_rank": 64}), llm, tok, blocks, PARTS, tmp_path / "adapter")
    rounds = [json.loads(x) for x in (tmp_path / "adapter" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["energy_kept_min"] == pytest.approx(1.0, abs=1e-6)
    llm_m, tok_m, blocks_m = fresh_setup()  # merge mode changes the LLM and the blocks
    run_federation(tiny_config(fed={"rounds": 1, "broadcast": "merge"}), llm_m, tok_m, blocks_m, PARTS,
                   tmp_path / "merge", progress=False)
    for name, delta in global_delta(adapter).items():
        torch.testing.assert_close(llm_m.get_submodule(name).weight, llm.get_submodule(name).weight + delta,
                                   atol=1e-5, rtol=0)
        # and the 50% block took the same update through its mask
        want = blocks[1].masks[name] * (llm.get_submodule(name).weight + delta)
        torch.testing.assert_close(blocks_m[1].model.get_submodule(name).weight, want, atol=1e-5, rtol=0)
    blocks[1].release()
    blocks_m[1].release()
