"""What an LLM module's qualified name says: its decoder layer and its kind, the index columns of every table."""

from __future__ import annotations


def layer_of(name: str) -> int:
    """The decoder layer of a module name (``model.layers.3.mlp.up_proj`` -> 3), -1 outside the layers."""
    return next((int(p) for p in name.split(".") if p.isdigit()), -1)
