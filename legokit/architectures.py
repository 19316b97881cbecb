"""The decoder families legokit supports, the check that refuses the others, and their tiny test configs.

legokit prunes, views and adapts a decoder through its seven projections (``names.LORA_TARGETS``: q/k/v/o in
attention, gate/up/down in the MLP), each a separate ``nn.Linear`` under ``model.model.layers``. The families in
``FAMILIES`` have exactly that layout and are covered by ``tests/test_architectures.py``; what differs between
them is handled where it matters:

- Llama: grouped-query attention, RoPE.
- Qwen2: biases on q/k/v (a structured block keeps the biases of its kept rows; views and masked LoRA add them).
- Mistral: a sliding attention window on every layer (the calibration pass hands each layer its own mask).
- Gemma 3 text (``Gemma3ForCausalLM``): RMS norms on the queries and keys per head, sliding-window and full
  layers with their own masks and rotary tables, and a ``head_dim`` set explicitly, not hidden / heads (a
  structured block keeps whole heads, so the norms keep their size).

Any other model type is refused by ``check_model`` with its type and this list, before any work; so is a model
whose projections are fused (Phi-3's ``qkv_proj`` and ``gate_up_proj``), whose q/k/v or gate/up rows would
need masks split per projection. ``tiny_settings`` gives the tiny configs (``models.tiny_model`` builds
them as ``tiny-qwen2``, ``tiny-mistral``, ``tiny-gemma3``; ``tiny-llama`` is ``models.tiny_llama``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from legokit.names import LORA_TARGETS
from legokit.utils import LegokitError


@dataclass(frozen=True)
class Family:
    """One supported decoder family: its ``config.model_type``, its causal-LM class and what sets it apart."""

    key: str  # short name: the tiny model is ``tiny-<key>``
    name: str
    model_type: str
    causal_lm: str
    features: str
    tiny: dict = field(default_factory=dict)  # config settings of the tiny model beyond the shared ones


FAMILIES = {f.key: f for f in (
    Family("llama", "Llama", "llama", "LlamaForCausalLM", "grouped-query attention, RoPE"),
    Family("qwen2", "Qwen2", "qwen2", "Qwen2ForCausalLM", "biases on q/k/v",
           tiny={"tie_word_embeddings": True}),
    Family("mistral", "Mistral", "mistral", "MistralForCausalLM", "sliding-window attention",
           tiny={"sliding_window": 16, "tie_word_embeddings": False}),
    Family("gemma3", "Gemma 3 (text)", "gemma3_text", "Gemma3ForCausalLM",
           "q/k norms, sliding-window and full layers, head_dim not hidden / heads",
           tiny={"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16,
                 "layer_types": ["sliding_attention", "full_attention"]}),
)}
TINY_PREFIX = "tiny-"


def supported() -> str:
    """The supported families as one phrase, for error messages."""
    return "; ".join(f"{f.name} ({f.causal_lm}, model_type {f.model_type!r})" for f in FAMILIES.values())


def family_of(model: nn.Module) -> Family | None:
    """The supported family of ``model`` (by ``config.model_type``), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES.values() if f.model_type == model_type), None)


def _projections(layer: nn.Module) -> dict[str, nn.Module]:
    """The linear layers directly under a decoder layer's blocks (``self_attn.q_proj``, ``mlp.gate_up_proj``), by
    short name; a LoRA wrapper counts as its ``base_layer`` (its own ``lora_A`` / ``lora_B`` sit one level deeper)."""
    out = {}
    for name, mod in layer.named_modules():
        base = getattr(mod, "base_layer", mod)
        if name.count(".") == 1 and isinstance(base, nn.Linear):
            out[name.rsplit(".", 1)[-1]] = base
    return out


def fused_projections(model: nn.Module) -> list[str]:
    """Short names of the linear layers of the decoder layers that are none of the seven projections
    (``qkv_proj``, ``gate_up_proj`` on Phi-3), sorted; empty for a supported layout."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return []
    return sorted({n for layer in layers for n in _projections(layer) if n not in LORA_TARGETS})


def check_model(model: nn.Module) -> Family:
    """Return ``model``'s family, or raise ``LegokitError`` naming its type, its fused projections (if any) and
    the supported families. Reads module names only: works on a ``meta`` skeleton before any weight is loaded,
    and on a model with LoRA attached.
    """
    kind = f"{type(model).__name__} (model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r})"
    fused = fused_projections(model)
    if fused:
        raise LegokitError(
            f"{kind} has fused projections {fused}: legokit prunes and adapts q/k/v/o and gate/up/down as separate "
            f"linear layers, and does not split fused ones into per-projection masks. Supported: {supported()}")
    family = family_of(model)
    if family is None:
        raise LegokitError(f"{kind} is not a supported architecture. Supported: {supported()}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    missing = [t for t in LORA_TARGETS if layers is None or t not in _projections(layers[0])]
    if missing:
        raise LegokitError(f"{kind} has not the {family.name} layout legokit expects (`.model.layers` with "
                           f"{list(LORA_TARGETS)} as linear layers; missing {missing}): is it a modified model? "
                           f"Supported: {supported()}")
    return family


def tiny_family(name: str) -> Family | None:
    """The family of a tiny model name (``"tiny-qwen2"`` -> Qwen2), or None for any other name."""
    if not name.startswith(TINY_PREFIX):
        return None
    return FAMILIES.get(name[len(TINY_PREFIX):])


def tiny_settings(key: str, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  intermediate: int = 128) -> dict:
    """The config settings of the tiny ``key`` model (``FAMILIES``), for its class's config: 2 layers, hidden 64,
    grouped-query attention (4 heads, 2 kv heads), the vocabulary and special tokens of ``tokenizer``, and the
    family's own features (``Family.tiny``)."""
    if key not in FAMILIES:
        raise LegokitError(f"no tiny model of family {key!r}: use one of {sorted(FAMILIES)}")
    return {"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 512, "tie_word_embeddings": True, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            **FAMILIES[key].tiny}
