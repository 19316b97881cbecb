"""legokit.coords: a structured block's SLM coordinates and the LLM's, both ways, for weights and LoRA factors."""

import pytest
import torch
from helpers import river_paragraphs

from legokit.blocks import extract_blocks
from legokit.utils import LegokitError

KW = dict(n_calib=4, seq_len=32, texts=river_paragraphs(24), progress=False)


def test_structured_coordinates_round_trip(tiny):
    llm, tok = tiny
    b = extract_blocks(llm, tok, (0.5,), method="magnitude", pattern="structured", **KW)[0]
    g = torch.Generator().manual_seed(1)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                 "model.layers.1.mlp.down_proj"):
        w_llm = llm.get_submodule(name).weight
        w_slm = b.model.get_submodule(name).weight
        assert tuple(w_slm.shape) == b.coords.local_shape(name) != tuple(w_llm.shape)
        assert torch.equal(b.coords.expand(name, w_slm), w_llm * b.masks[name])  # expanded = masked LLM weight
        t = torch.randn(w_slm.shape, generator=g)
        assert torch.equal(b.coords.shrink(name, b.coords.expand(name, t)), t)
        A, B = torch.randn(3, w_slm.shape[1], generator=g), torch.randn(w_slm.shape[0], 3, generator=g)
        A_l, B_l = b.coords.expand_factors(name, A, B)
        torch.testing.assert_close(B_l @ A_l, b.coords.expand(name, B @ A))
        assert all(torch.equal(x, y) for x, y in zip(b.coords.shrink_factors(name, A_l, B_l), (A, B), strict=True))
        with pytest.raises(LegokitError, match="SLM"):
            b.coords.expand(name, w_llm)
    b.release()
