"""`legokit setup` in a scratch cache: builds from the cached wheels, verifies, repairs corruption."""

import json
import os
import shutil

import pytest

from legokit import assets
from legokit.utils import cache_dir, sha256_file


@pytest.fixture(scope="module")
def scratch_cache(tmp_path_factory):
    """A cache holding only the two wheels (copied from the real cache that `make test` set up)."""
    real = cache_dir()
    wheels = sorted((real / "wheels").glob("*.whl"))
    if len(wheels) < 2:
        pytest.fail(f"no wheels in {real / 'wheels'}: run `legokit setup` first (make test does)")
    root = tmp_path_factory.mktemp("cache")
    (root / "wheels").mkdir()
    for w in wheels:
        shutil.copy(w, root / "wheels" / w.name)
    return root, real


@pytest.mark.slow
def test_setup_builds_verifies_and_repairs(scratch_cache, monkeypatch):
    scratch_cache, real_cache = scratch_cache
    monkeypatch.setenv("LEGOKIT_CACHE", str(scratch_cache))
    manifest = assets.setup()
    files = manifest["files"]
    assert files["data/boolq/test.jsonl"]["count"] == 500
    assert "models/smollm2-135m-instruct/model.safetensors" in files
    # the real cache and the scratch one hold byte-identical prepared files (seeded, deterministic)
    real = json.loads((real_cache / "manifest.json").read_text())["files"]
    assert {k: v["sha256"] for k, v in files.items()} == {k: v["sha256"] for k, v in real.items()}

    # a second run only verifies: nothing is rewritten
    model = scratch_cache / "models/smollm2-135m-instruct/model.safetensors"
    mtime = model.stat().st_mtime_ns
    assert assets.setup()["files"] == files
    assert model.stat().st_mtime_ns == mtime  # (how long a verify-only setup takes belongs in bench/)

    # a corrupted prepared file is detected by sha256 and rebuilt
    target = scratch_cache / "data/asdiv/test.jsonl"
    good = sha256_file(target)
    with open(target, "r+b") as f:
        f.write(b"garbage")
    assert assets.verify() == ["data/asdiv/test.jsonl"]
    assets.setup()
    assert sha256_file(target) == good and assets.verify() == []

    # a missing file too
    os.remove(target)
    assets.setup()
    assert sha256_file(target) == good
