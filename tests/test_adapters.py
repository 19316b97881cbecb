"""Adapters in peft's naming and saved format: keys, round trips through peft itself, one scaling for all
ranks, refusing pickles (tiny-llama, CPU)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import random_factors, token_ids

from legokit.adapters import (
    factors_to_peft_state,
    load_peft_adapter,
    lora_state_dict,
    peft_state_to_factors,
    save_peft_adapter,
)
from legokit.config import LoraConfig
from legokit.lora import attach_lora, delta_weight, detach_lora, lora_factors
from legokit.models import load_model
from legokit.utils import LegokitError


def _peft_logits(adapter_dir, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a fresh tiny-llama with the adapter in ``adapter_dir`` loaded by peft itself."""
    from peft import PeftModel

    fresh, _ = load_model("tiny-llama", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(fresh, adapter_dir)
    with torch.no_grad():
        return pm(input_ids=ids).logits


def test_state_dict_uses_peft_naming(tiny_fresh):
    model, _ = tiny_fresh
    attach_lora(model, LoraConfig(rank=3, target_modules=["q_proj", "down_proj"]))
    state = lora_state_dict(model)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, 64)
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (3, 128)
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 3)
    assert len(state) == 8 and all(t.device.type == "cpu" and not t.requires_grad for t in state.values())


def test_keys_match_what_peft_itself_saves(tiny_fresh, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors.torch import load_file

    model, _ = tiny_fresh
    targets = ["q_proj", "v_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pcfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
        pm = get_peft_model(model, pcfg)
        pm.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    model2, _ = load_model("tiny-llama", device="cpu")
    attach_lora(model2, LoraConfig(rank=4, alpha=8, target_modules=targets))
    ours = lora_state_dict(model2)
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_peft_round_trip_matches_manual_merge(tiny_fresh, tmp_path):
    model, _ = tiny_fresh
    x = token_ids()
    init = random_factors(model, lambda i: 2 if i % 3 == 0 else 4)  # mixed ranks -> rank_pattern
    attach_lora(model, LoraConfig(rank=4, alpha=8), init=init)
    factors = lora_factors(model)
    save_peft_adapter(tmp_path / "ad", factors, "tiny-llama", alpha=8,
                      target_modules=list(LoraConfig().target_modules))
    detach_lora(model, merge=True)
    with torch.no_grad():
        merged = model(x).logits
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 2 and len(cfg["rank_pattern"]) == 5
    torch.testing.assert_close(_peft_logits(tmp_path / "ad", x), merged, atol=1e-5, rtol=0)
    back, alpha = load_peft_adapter(tmp_path / "ad")
    assert alpha == 8 and sorted(back) == sorted(factors)
    for n in factors:
        assert torch.equal(back[n][0], factors[n][0]) and torch.equal(back[n][1], factors[n][1])


def test_peft_adapter_with_one_scaling_for_all_ranks(tiny_fresh, tmp_path):
    model, _ = tiny_fresh
    x = token_ids()
    init = random_factors(model, lambda i: 2 if i % 2 else 4)
    attach_lora(model, LoraConfig(rank=4), init=init, scaling=0.75)
    save_peft_adapter(tmp_path / "ad", lora_factors(model), "tiny-llama", alpha=None, scaling=0.75)
    detach_lora(model, merge=True)
    with torch.no_grad():
        merged = model(x).logits
    torch.testing.assert_close(_peft_logits(tmp_path / "ad", x), merged, atol=1e-5, rtol=0)
    back, alpha = load_peft_adapter(tmp_path / "ad")  # folded to (alpha / r_module) B A
    same, _ = load_peft_adapter(tmp_path / "ad", scaling=0.75)  # folded to 0.75 B A
    for n, (A, B) in back.items():
        torch.testing.assert_close(delta_weight(A, B, alpha / A.shape[0]), delta_weight(*init[n], 0.75))
        torch.testing.assert_close(delta_weight(*same[n], 0.75), delta_weight(*init[n], 0.75))


def test_load_refuses_pickles(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(LegokitError, match="pickle"):
        load_peft_adapter(tmp_path)


def test_factors_to_peft_state_is_the_inverse_of_loading():
    f = {"model.layers.0.mlp.up_proj": (torch.ones(2, 3), torch.zeros(4, 2))}
    state = factors_to_peft_state(f)
    assert sorted(state) == ["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                             "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    back = peft_state_to_factors(state)
    assert torch.equal(back["model.layers.0.mlp.up_proj"][0], f["model.layers.0.mlp.up_proj"][0])
    with pytest.raises(LegokitError, match="lora_B"):
        peft_state_to_factors({"base_model.model.x.lora_A.weight": torch.ones(1, 1)})
