"""Fixtures shared by the unit tests: tiny-llama models, built in memory (no asset is needed).

Which one to take:

- ``tiny``: one seeded random tiny-llama ``(model, tokenizer)`` per test module, on CPU. Shared by the
  module's tests, so READ-ONLY: a test that changes weights, attaches LoRA or trains takes ``tiny_fresh``
  or works on a ``copy.deepcopy``. At the end of the module the fixture checks that no test changed it.
- ``tiny_fresh``: a new tiny-llama for each test, free to mutate.
- ``tiny_varied``: like ``tiny``, with every weight perturbed by N(0, 0.5²) (seeded), so that
  outputs differ visibly between tokens and prompts (the random tiny-llama's std-0.02 init gives near-uniform
  next-token distributions). Read-only as well, and checked the same way.
- ``tiny_family``: each supported family's tiny model in turn (``models.TINY_MODELS``: tiny-llama, tiny-qwen2,
  tiny-mistral, tiny-gemma3), a module-scoped parametrized fixture: a test that takes it runs once per family.
  Read-only as well, and checked the same way.
- ``setup_llm``: ``tiny`` and its Wanda blocks at 0 and 50% (``helpers.extract_tiny_blocks``), per test module.
  Read-only as well: adapter-mode runs only (merge mode changes the LLM: take ``helpers.fresh_setup()``).
- ``device``: runs a test once per device: ``cpu`` always, ``cuda`` when torch sees a GPU (skipped otherwise;
  CI has none). ``bench/gpu_check.py`` runs these tests on a GPU machine.

Plain helpers (calibration texts, examples, the tiny config, the tiny federation) are in ``tests/helpers.py``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import extract_tiny_blocks

from legokit.models import TINY_MODELS, load_model


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here (the test runs on CPU; bench/gpu_check.py on a GPU)"))])
def device(request) -> torch.device:
    """Each device the test should run on: the CPU, and CUDA when present."""
    return torch.device(request.param)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor], fixture: str) -> None:
    after = model.state_dict()
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert not (added or removed or changed), (
        f"a test changed the shared module-scoped `{fixture}` model (added {added[:3]}, removed {removed[:3]}, "
        f"changed {changed[:3]}): take `tiny_fresh` or a deepcopy in tests that mutate it")


@pytest.fixture(scope="module")
def tiny():
    """The seeded random tiny-llama ``(model, tokenizer)`` on CPU, shared by one module: do not mutate."""
    model, tok = load_model("tiny-llama", device="cpu")
    before = _snapshot(model)
    yield model, tok
    _assert_untouched(model, before, "tiny")


@pytest.fixture()
def tiny_fresh():
    """A new tiny-llama ``(model, tokenizer)`` on CPU for one test, free to mutate."""
    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def tiny_varied():
    """tiny-llama with every weight perturbed by ``0.5 * randn`` (seed 0): varied outputs. Do not mutate."""
    model, tok = load_model("tiny-llama", device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    before = _snapshot(model)
    yield model, tok
    _assert_untouched(model, before, "tiny_varied")


@pytest.fixture(scope="module", params=TINY_MODELS)
def tiny_family(request):
    """One supported family's seeded random tiny model ``(model, tokenizer)`` per parameter: do not mutate."""
    model, tok = load_model(request.param, device="cpu")
    before = _snapshot(model)
    yield model, tok
    _assert_untouched(model, before, "tiny_family")


@pytest.fixture(scope="module")
def setup_llm(tiny):
    """The module's shared tiny-llama (read-only: adapter-mode runs only) and its blocks at 0 and 50%."""
    llm, tok = tiny
    return llm, tok, extract_tiny_blocks(llm, tok)
