"""Building a block's SLM: a ``transformers`` model of the LLM's class, made from the LLM as it is now.

``block`` is a ``legokit.blocks.Block`` (used through its ``llm``, ``shapes``, ``masks``, ``coords``,
``overrides`` and ``sizes``; this module does not import blocks, which imports it).

``build_slm(block)`` is what ``block.model`` calls on first access. Pruned linear weights are new tensors
(``M ⊙ W_llm``, or the block's stored values where pruning reconstructed them; a structured block's kept rows
and columns); embeddings, norms and the LM head share the LLM's storage read-only. A structured block's SLM
gets a smaller config (fewer heads and MLP channels), so it is physically smaller.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from legokit.prune import apply_mask


@torch.no_grad()
def slm_weight(block, name: str, w_llm: torch.Tensor | None = None) -> torch.Tensor:
    """The block's base weight of one module in its own coordinates (a new tensor).

    ``w_llm``: the LLM's weight of that module (default: read it from ``block.llm``).
    """
    w = block.llm.get_submodule(name).weight if w_llm is None else w_llm
    if block.structured:
        return block.coords.shrink(name, w)
    if name in block.overrides:
        out = torch.zeros_like(w)
        out[block.masks[name].to(w.device)] = block.overrides.get(name).to(w.device, w.dtype)
        return out
    if block.dense:
        return w.detach().clone()
    return apply_mask(w, block.masks[name])


def attention_dims(llm: nn.Module) -> dict[str, int]:
    """``num_heads``, ``num_kv_heads`` and ``head_dim`` of a Llama-style config."""
    c = llm.config
    return {"num_heads": c.num_attention_heads, "num_kv_heads": getattr(c, "num_key_value_heads", None)
            or c.num_attention_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads}


@torch.no_grad()
def build_slm(block) -> nn.Module:
    """The block's SLM, built from ``block.llm`` as it is now plus the block's stored values."""
    llm = block.llm
    config = copy.deepcopy(llm.config)
    if block.structured and block.sizes is not None:
        config.head_dim = attention_dims(llm)["head_dim"]  # unchanged; hidden / heads no longer gives it
        config.num_attention_heads = block.sizes.heads
        config.num_key_value_heads = block.sizes.kv_heads
        config.intermediate_size = block.sizes.channels
    with torch.device("meta"):  # no memory until the real tensors are assigned
        model = type(llm)(config)
    state = {}
    for key, t in llm.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod in block.shapes and leaf == "weight":
            state[key] = slm_weight(block, mod, t)
        elif mod in block.shapes and leaf == "bias" and block.structured:
            rows = block.index[mod][0]
            state[key] = t.clone() if rows is None else t.index_select(0, rows.to(t.device))
        elif mod in block.shapes:
            state[key] = t.clone()
        else:
            state[key] = t  # embeddings, norms, LM head: the LLM's storage, read-only by contract
    model.load_state_dict(state, assign=True, strict=True)
    for key, buf in llm.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in state
        mod, _, leaf = key.rpartition(".")
        model.get_submodule(mod)._buffers[leaf] = buf
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = copy.deepcopy(getattr(llm, "generation_config", None))
    model.name_or_path = f"{getattr(llm, 'name_or_path', 'llm')}:{block.id}"
    return model.train(llm.training)
