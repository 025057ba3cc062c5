"""CompileCache: build once, verify on every get, discard bad entries, shared read-through."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from compile_cache import (FORMAT_VERSION, CacheEntry, CacheError, CompileCache, CorruptEntryError,
                           IncompatibleEntryError)
from cc_helpers import make_key, write_artifacts

LOGGER = "llmcore.compile_cache"


class Builder:
    """build_fn that counts its calls."""

    def __init__(self, payload: bytes = b"graph" * 200):
        self.calls = 0
        self.payload = payload

    def __call__(self, tmp: Path):
        self.calls += 1
        return write_artifacts(tmp, self.payload)


def test_get_or_build_builds_once(cache, key):
    build = Builder()
    assert cache.get(key) is None
    e1 = cache.get_or_build(key, build, metadata={"torch": "2.13.0"})
    assert build.calls == 1
    assert isinstance(e1, CacheEntry)
    assert e1.path == cache.root / key.short()
    assert e1.digest == key.digest() and e1.key == key
    assert sorted(e1.files) == ["kernels/k0.so", "model.pt2"]
    assert e1.file("model.pt2").read_bytes() == build.payload
    assert e1.metadata == {"torch": "2.13.0", "model": "tiny-llama", "compiler_log_lines": 3}
    assert e1.size_bytes == sum((e1.path / f).stat().st_size for f in e1.files)
    assert e1.created_at > 0

    e2 = cache.get_or_build(key, build)
    assert build.calls == 1
    assert e2.digest == e1.digest and e2.path == e1.path
    assert cache.get(key).metadata == e1.metadata
    # Only the entry, its lock file and the cache tag; no temp dirs left.
    assert sorted(p.name for p in cache.root.iterdir()) == sorted([key.short(), key.short() + ".lock", "CACHEDIR.TAG"])


def test_manifest_contents(cache, key):
    entry = cache.get_or_build(key, Builder(), metadata={"packages": {"torch": "2.13.0"}})
    m = json.loads((entry.path / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    assert m["key_digest"] == key.digest()
    assert m["key"] == key.to_dict()
    assert {f["path"] for f in m["files"]} == {"model.pt2", "kernels/k0.so"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in m["files"])
    assert m["environment"]["python"] and m["metadata"]["packages"] == {"torch": "2.13.0"}
    assert isinstance(m["build_seconds"], float)


def test_entry_file_rejects_unknown_and_escaping_names(cache, key):
    entry = cache.get_or_build(key, Builder())
    with pytest.raises(CacheError, match="has no file"):
        entry.file("nope.bin")
    with pytest.raises(CacheError):
        entry.file("../manifest.json")


def test_failed_build_leaves_nothing(cache, key):
    def boom(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.get_or_build(key, boom)
    assert cache.get(key) is None
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("build_fn,match", [
    (lambda tmp: None, "no artifact files"),
    (lambda tmp: (tmp / "manifest.json").write_text("{}") and None, "manifest.json"),
    (lambda tmp: (tmp / "a").write_text("x") and {"bad": object()}, "JSON-serialisable"),
    (lambda tmp: (tmp / "a").write_text("x") and ["not", "a", "dict"], "must return a dict"),
])
def test_bad_build_output_is_an_error(cache, key, build_fn, match):
    with pytest.raises(CacheError, match=match):
        cache.get_or_build(key, build_fn)
    assert cache.get(key) is None


def test_symlink_in_build_output_rejected(cache, key, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")

    def build(tmp):
        (tmp / "link.bin").symlink_to(outside)

    with pytest.raises(CacheError, match="symlink"):
        cache.get_or_build(key, build)


def test_progress_messages(cache, key):
    msgs = []
    cache.get_or_build(key, Builder(), progress=msgs.append)
    assert any("compiling" in m for m in msgs) and any("stored" in m for m in msgs)


# ---------------------------------------------------------------- corruption


def _corrupt_flip(entry):
    p = entry.file("model.pt2")
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))


def _corrupt_truncate(entry):
    p = entry.file("model.pt2")
    p.write_bytes(p.read_bytes()[:-7])


def _corrupt_delete_manifest(entry):
    (entry.path / "manifest.json").unlink()


def _corrupt_delete_file(entry):
    entry.file("kernels/k0.so").unlink()


def _corrupt_key_mismatch(entry):
    mp = entry.path / "manifest.json"
    m = json.loads(mp.read_text())
    m["key"]["dtype"] = "float32"  # key no longer hashes to key_digest / dir name
    mp.write_text(json.dumps(m))


def _corrupt_key_consistent_but_other(entry):
    mp = entry.path / "manifest.json"
    m = json.loads(mp.read_text())
    other = make_key(dtype="float32")
    m["key"], m["key_digest"] = other.to_dict(), other.digest()  # self-consistent, wrong dir
    mp.write_text(json.dumps(m))


def _corrupt_format_version(entry):
    mp = entry.path / "manifest.json"
    m = json.loads(mp.read_text())
    m["format_version"] = FORMAT_VERSION + 1
    mp.write_text(json.dumps(m))


def _corrupt_garbage_manifest(entry):
    (entry.path / "manifest.json").write_bytes(b"\x00not json")


def _corrupt_extra_file(entry):
    (entry.path / "sneaky.so").write_bytes(b"x")


CORRUPTIONS = {
    "flipped-bytes": (_corrupt_flip, "corrupt", "sha256 mismatch"),
    "truncated": (_corrupt_truncate, "corrupt", "truncated"),
    "missing-manifest": (_corrupt_delete_manifest, "incomplete", "manifest.json is missing"),
    "missing-file": (_corrupt_delete_file, "incomplete", "missing"),
    "key-mismatch": (_corrupt_key_mismatch, "corrupt", "key"),
    "other-key": (_corrupt_key_consistent_but_other, "corrupt", "does not match key digest"),
    "format-version": (_corrupt_format_version, "incompatible", "format_version"),
    "garbage-manifest": (_corrupt_garbage_manifest, "corrupt", "not valid JSON"),
    "unexpected-file": (_corrupt_extra_file, "corrupt", "unexpected file"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_bad_entry_is_detected_discarded_and_rebuilt(cache, key, caplog, name):
    damage, status, problem = CORRUPTIONS[name]
    build = Builder()
    entry = cache.get_or_build(key, build)
    damage(entry)

    if name != "flipped-bytes":  # quick ls checks sizes, not hashes
        assert cache.ls()[0].status == status
    assert [(r.status, problem in r.problem) for r in cache.verify()] == [(status, True)]

    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert cache.get(key) is None
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert warnings and status in warnings[0].getMessage() and problem in warnings[0].getMessage()
    assert not entry.path.exists()  # moved aside and removed

    rebuilt = cache.get_or_build(key, build)
    assert build.calls == 2
    assert rebuilt.file("model.pt2").read_bytes() == build.payload
    assert cache.verify() == [(key.digest(), "ok", "")]


def test_get_or_build_rebuilds_corrupt_entry_directly(cache, key):
    build = Builder()
    _corrupt_flip(cache.get_or_build(key, build))
    entry = cache.get_or_build(key, build)
    assert build.calls == 2 and cache.get(key).digest == entry.digest


def test_quick_ls_misses_flipped_bytes_but_verify_catches_them(cache, key):
    _corrupt_flip(cache.get_or_build(key, Builder()))
    assert cache.ls()[0].status == "ok"  # sizes only
    assert cache.ls(verify_hashes=True)[0].status == "corrupt"


def test_size_only_mode(tmp_path, key):
    fast = CompileCache(root=tmp_path / "root", verify_hashes=False)
    entry = fast.get_or_build(key, Builder())
    _corrupt_flip(entry)
    assert fast.get(key) is not None           # documented trade-off
    assert CompileCache(root=tmp_path / "root").get(key) is None


def test_foreign_dirs_ignored(cache, key):
    cache.get_or_build(key, Builder())
    (cache.root / "notes").mkdir()
    (cache.root / "README.txt").write_text("hi")
    assert [r.status for r in cache.ls()] == ["ok"]
    assert len(cache.entries()) == 1


# ---------------------------------------------------------------- put


def test_put_directory_files_and_mapping(cache, tmp_path):
    src = tmp_path / "built"
    src.mkdir()
    write_artifacts(src)
    k1, k2, k3 = make_key(dtype="a"), make_key(dtype="b"), make_key(dtype="c")
    e1 = cache.put(k1, src, metadata={"m": 1})
    assert sorted(e1.files) == ["kernels/k0.so", "model.pt2"] and e1.metadata == {"m": 1}
    e2 = cache.put(k2, [src / "model.pt2", src / "kernels" / "k0.so"])
    assert sorted(e2.files) == ["k0.so", "model.pt2"]
    e3 = cache.put(k3, {"graph/model.pt2": src / "model.pt2"})
    assert e3.files == ["graph/model.pt2"]
    assert [r.status for r in cache.verify()] == ["ok"] * 3
    assert src.exists()  # copied, not moved


def test_put_keeps_existing_unless_replace(cache, key, tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    cache.put(key, {"x.bin": a})
    assert cache.put(key, {"x.bin": b}).file("x.bin").read_bytes() == b"A"
    assert cache.put(key, {"x.bin": b}, replace=True).file("x.bin").read_bytes() == b"B"
    assert cache.get(key).file("x.bin").read_bytes() == b"B"


def test_put_errors(cache, key, tmp_path):
    with pytest.raises(CacheError, match="no such file"):
        cache.put(key, tmp_path / "missing")
    f = tmp_path / "f.bin"
    f.write_bytes(b"1")
    with pytest.raises(CacheError, match="unsafe"):
        cache.put(key, {"../evil": f})
    with pytest.raises(CacheError, match="two artifacts"):
        cache.put(key, [f, f])
    assert cache.get(key) is None
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------- shared


def _shared_with_entry(tmp_path, key):
    shared = CompileCache(root=tmp_path / "shared")
    build = Builder(b"shared-graph" * 50)
    shared.get_or_build(key, build, metadata={"origin": "team"})
    return shared


def test_shared_read_through(tmp_path, key):
    shared = _shared_with_entry(tmp_path, key)
    cache = CompileCache(root=tmp_path / "root", shared=shared.root)
    entry = cache.get(key)
    assert entry is not None and entry.path == cache.root / key.short()
    assert entry.metadata["origin"] == "team"
    assert entry.file("model.pt2").read_bytes() == b"shared-graph" * 50
    # manifest copied verbatim; shared untouched
    assert (entry.path / "manifest.json").read_bytes() == (shared.root / key.short() / "manifest.json").read_bytes()
    assert shared.verify() == [(key.digest(), "ok", "")]
    # get_or_build is a hit without building
    assert cache.get_or_build(key, lambda tmp: pytest.fail("must not build")).path == entry.path


def test_shared_from_env(tmp_path, key, monkeypatch):
    shared = _shared_with_entry(tmp_path, key)
    monkeypatch.setenv("LLMCORE_SHARED_CACHE_DIR", str(shared.root))
    monkeypatch.setenv("LLMCORE_CACHE_DIR", str(tmp_path / "from-env"))
    cache = CompileCache()
    assert cache.root == tmp_path / "from-env" and cache.shared == shared.root
    assert cache.get(key).path == tmp_path / "from-env" / key.short()


def test_corrupt_shared_entry_not_used(tmp_path, key, caplog):
    shared = _shared_with_entry(tmp_path, key)
    _corrupt_flip(shared.get(key))
    cache = CompileCache(root=tmp_path / "root", shared=shared.root)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert cache.get(key) is None
    assert any("shared" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert (shared.root / key.short()).exists()          # read-only: never deleted
    assert not (cache.root / key.short()).exists()
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".tmp-")]
    build = Builder()
    cache.get_or_build(key, build)
    assert build.calls == 1


def test_truncated_shared_entry_not_used(tmp_path, key):
    shared = _shared_with_entry(tmp_path, key)
    _corrupt_truncate(shared.get(key))
    assert CompileCache(root=tmp_path / "root", shared=shared.root).get(key) is None


def test_local_entry_preferred_over_shared(tmp_path, key):
    shared = _shared_with_entry(tmp_path, key)
    cache = CompileCache(root=tmp_path / "root", shared=shared.root)
    local = cache.put(key, {"model.pt2": _file(tmp_path, b"local")}, replace=True)
    assert cache.get(key).file("model.pt2").read_bytes() == b"local" and local.path.parent == cache.root


def _file(tmp_path, data):
    p = tmp_path / "src.bin"
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------- resolve / remove


def test_resolve_and_remove(cache):
    keys = [make_key(dtype=f"d{i}") for i in range(3)]
    for k in keys:
        cache.get_or_build(k, Builder())
    k = keys[0]
    assert cache.resolve(k.digest()).digest == k.digest()
    assert cache.resolve(k.digest()[:8]).digest == k.digest()
    assert cache.resolve(k.digest()[:20]).digest == k.digest()          # longer than the dir name
    assert cache.resolve(str(cache.root / k.short())).digest == k.digest()
    assert cache.resolve(cache.root / k.short() / "manifest.json").digest == k.digest()
    unknown = "f" * 64 if not k.digest().startswith("f") else "0" * 64
    with pytest.raises(CacheError, match="cache ls"):
        cache.resolve(unknown)
    with pytest.raises(CacheError, match="not a key digest"):
        cache.resolve("xyz!")
    with pytest.raises(CacheError, match="no cache entry directory"):
        cache.resolve(str(cache.root / "nope"))

    _corrupt_flip(cache.resolve(keys[1].short()))
    with pytest.raises(CorruptEntryError, match="sha256"):
        cache.resolve(keys[1].short())
    _corrupt_format_version(cache.resolve(keys[2].short()))
    with pytest.raises(IncompatibleEntryError):
        cache.resolve(keys[2].short())

    removed = cache.remove(k.short()[:10])
    assert removed == cache.root / k.short() and not removed.exists()
    with pytest.raises(CacheError, match="no compile cache entry"):
        cache.remove(k.short())
    assert cache.get(k) is None


def test_ambiguous_prefix(cache):
    by_first = {}
    i = 0
    while True:  # find two keys whose digests share the first hex digit
        k = make_key(dtype=f"d{i}")
        if k.digest()[0] in by_first:
            break
        by_first[k.digest()[0]] = k
        i += 1
    other = by_first[k.digest()[0]]
    cache.get_or_build(k, Builder())
    cache.get_or_build(other, Builder())
    prefix = k.digest()[0]
    for op in (cache.resolve, cache.remove):
        with pytest.raises(CacheError, match="several entries") as ei:
            op(prefix)
        assert k.short() in str(ei.value) and other.short() in str(ei.value)
    assert len(cache.verify(prefix)) == 2  # verify checks every match


def test_get_leaves_bad_entry_alone_while_its_lock_is_held(cache, key, caplog):
    from compile_cache import KeyLock

    entry = cache.get_or_build(key, Builder())
    _corrupt_flip(entry)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with KeyLock(cache.root / f"{key.short()}.lock"):
        assert cache.get(key) is None
        assert entry.path.exists()
        assert cache.prune() == []          # prune respects the lock too
    assert any("leaving it alone" in r.getMessage() for r in caplog.records)
    assert cache.get(key) is None and not entry.path.exists()


def test_fingerprint_via_cache_memo(cache, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"gguf" * 1000)
    fp = cache.fingerprint_model(f)
    assert fp.startswith("sha256:") and (cache.root / ".fingerprints.json").exists()


def test_shared_used_in_place_when_root_is_unwritable(tmp_path, key, caplog):
    shared = _shared_with_entry(tmp_path, key)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    cache = CompileCache(root=blocker / "root", shared=shared.root)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    entry = cache.get(key)
    assert entry is not None and entry.path == shared.root / key.short()
    assert any("using it in place" in r.getMessage() for r in caplog.records)


def test_shared_used_in_place_while_key_locked(tmp_path, key):
    from compile_cache import KeyLock

    shared = _shared_with_entry(tmp_path, key)
    cache = CompileCache(root=tmp_path / "root", shared=shared.root)
    cache.root.mkdir()
    with KeyLock(cache.root / f"{key.short()}.lock"):
        assert cache.get(key).path == shared.root / key.short()
    assert cache.get(key).path == cache.root / key.short()   # copied once the lock is free
