"""LoRA adapters on disk and on the wire, in peft's naming and format.

Adapters are written in peft's saved format (``adapter_config.json`` + ``adapter_model.safetensors``,
keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` without the adapter name), so
``peft.PeftModel.from_pretrained(llm, dir)`` loads them. Tensors are only ever read from safetensors.
Factors follow ``legokit.lora``'s convention: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``, the delta is
``(alpha / r) · B @ A`` per module, or ``scaling · B @ A`` for factors saved with one scaling.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from legokit.lora import lora_factors
from legokit.utils import LegokitError, atomic_write_bytes, atomic_write_json

PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<name>.+)\.(?P<which>lora_[AB])(?:\.[^.]+)?\.weight$")


def factors_to_peft_state(factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Factors in peft's saved naming: ``base_model.model.<name>.lora_A.weight`` / ``.lora_B.weight``."""
    state = {}
    for name, (A, B) in factors.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
    return state


def peft_state_to_factors(state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Inverse of ``factors_to_peft_state`` (also accepts keys that keep the adapter name)."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in state.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise LegokitError(f"{key!r} is not a LoRA factor key (base_model.model.<module>.lora_A.weight)")
        parts.setdefault(m["name"], {})[m["which"]] = t
    bad = sorted(n for n, d in parts.items() if set(d) != {"lora_A", "lora_B"})
    if bad:
        raise LegokitError(f"adapter state has lora_A without lora_B (or the reverse) for {bad[:3]}")
    return {n: (d["lora_A"], d["lora_B"]) for n, d in parts.items()}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's adapter in peft's saved naming (cloned, CPU)."""
    return factors_to_peft_state(lora_factors(model))


def save_peft_adapter(out_dir: str | Path, factors: Mapping[str, tuple[Tensor, Tensor]],
                      base_model_name_or_path: str, alpha: float | None,
                      target_modules: list[str] | None = None, rank: int | None = None, *,
                      scaling: float | None = None) -> Path:
    """Write a peft LoRA adapter that ``PeftModel.from_pretrained(llm, out_dir)`` loads.

    Args:
        out_dir: directory for ``adapter_config.json`` and ``adapter_model.safetensors``.
        factors: {module name: (A, B)} with each module's delta ``(alpha / r_module) · B @ A``.
        base_model_name_or_path: recorded in the config (peft does not need to resolve it).
        alpha: ``lora_alpha``.
        target_modules: module-name suffixes (default: those of the factor names).
        rank: the config's ``r`` (default: the most common rank); other ranks go to ``rank_pattern``.
        scaling: instead of ``alpha``: every module's delta is ``scaling · B @ A`` whatever its rank
            (written as ``lora_alpha = scaling · r`` plus ``alpha_pattern`` for the other ranks).
    Returns:
        ``out_dir``.
    """
    if not factors:
        raise LegokitError("no LoRA factors to save: attach and train an adapter first")
    if (alpha is None) == (scaling is None):
        raise LegokitError("save_peft_adapter needs exactly one of alpha (scaling alpha / r per module) "
                           "or scaling (the same for every module)")
    ranks = {n: int(A.shape[0]) for n, (A, _) in factors.items()}
    r = rank if rank is not None else Counter(ranks.values()).most_common(1)[0][0]
    if scaling is not None:
        alpha = scaling * r
    alpha_pattern = {} if scaling is None else {n: scaling * k for n, k in ranks.items() if k != r}
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in factors})
    targets = sorted(target_modules) if target_modules is not None else suffixes
    missing = [s for s in suffixes if s not in targets]
    if missing:
        raise LegokitError(f"factors include modules {missing} that are not in target_modules={targets}")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(r),
        "lora_alpha": float(alpha),
        "target_modules": targets,
        # Keys are module names; peft matches them as `(.*\.)?<key>$`.
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": str(base_model_name_or_path),
        "revision": None,
    }
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in factors_to_peft_state(factors).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "adapter_model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_json(out_dir / "adapter_config.json", config)
    return out_dir


def load_peft_adapter(adapter_dir: str | Path, *,
                      scaling: float | None = None) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """Read a peft LoRA adapter (safetensors only) as ``(factors, alpha)``.

    Per-module ``alpha_pattern`` and rsLoRA scalings are folded into ``B`` so that every module's delta is
    ``(alpha / r_module) · B @ A`` (legokit's convention), or ``scaling · B @ A`` for every module when
    ``scaling`` is given (the inverse of ``save_peft_adapter(..., scaling=s)``).
    """
    d = Path(adapter_dir)
    cfg_path, st_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not st_path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise LegokitError(f"{d} holds only adapter_model.bin (a pickle); legokit never unpickles: "
                               "re-save the adapter with safetensors (peft's default)")
        raise LegokitError(f"{d} has no adapter_model.safetensors")
    if not cfg_path.is_file():
        raise LegokitError(f"{d} has no adapter_config.json")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise LegokitError(f"{d} is a {cfg.get('peft_type')} adapter (use_dora={cfg.get('use_dora')}): "
                           "only plain LoRA is supported")
    alpha = float(cfg["lora_alpha"])
    alpha_pattern = cfg.get("alpha_pattern") or {}
    factors = peft_state_to_factors(load_file(st_path))
    out = {}
    for name, (A, B) in factors.items():
        r = A.shape[0]
        a_mod = next((float(v) for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", name)), alpha)
        s_file = a_mod / math.sqrt(r) if cfg.get("use_rslora") else a_mod / r
        s_ours = alpha / r if scaling is None else scaling
        out[name] = (A, B if s_file == s_ours else B * (s_file / s_ours))
    return out, alpha
