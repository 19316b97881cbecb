"""The packed scorer against one unpadded forward per continuation, and the chunked vocabulary projection.

``tiny_varied`` (conftest): tiny-llama with perturbed weights, whose outputs vary enough to reveal a wrong mask.
"""

from __future__ import annotations

import random

import pytest
import torch

from legokit.likelihood import score_requests, target_logprobs
from legokit.utils import LegokitError


def _brute_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Unpadded, unbatched next-token log-probabilities: (T, V)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_packed_scorer_matches_one_unpadded_forward_per_continuation(tiny_varied):
    model, _ = tiny_varied
    vocab, rng = model.config.vocab_size, random.Random(0)
    requests = [([rng.randrange(vocab) for _ in range(rng.randrange(1, 40))],
                 [[rng.randrange(vocab) for _ in range(rng.randrange(1, 6))] for _ in range(rng.randrange(1, 5))])
                for _ in range(30)]
    with torch.inference_mode():
        # small rows and forwards: many requests share a row, several rows share a forward
        got = score_requests(model, requests, row_tokens=64, batch_tokens=200)
    for (prefix, conts), sums in zip(requests, got, strict=True):
        for cont, value in zip(conts, sums, strict=True):
            logp = _brute_logprobs(model, prefix + cont)
            want = sum(logp[len(prefix) - 1 + t, cont[t]].item() for t in range(len(cont)))
            assert value == pytest.approx(want, abs=1e-3)
    with pytest.raises(LegokitError, match="empty prefix"):
        score_requests(model, [([], [[1]])])


def test_target_logprobs_in_chunks_equal_one_projection(tiny_varied):
    """The vocabulary projection in chunks (never a (tokens x vocabulary) tensor) gives the one-shot values."""
    model, _ = tiny_varied
    head = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, model.config.hidden_size, generator=gen)
    targets = torch.randint(0, model.config.vocab_size, (11,), generator=gen)
    whole = torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[:, None])[:, 0]
    for chunk in (1, 3, 11, 64):
        torch.testing.assert_close(target_logprobs(head, hidden, targets, chunk=chunk), whole)
