"""KeyLock: exclusion, timeouts, and safe deletion of lock files by prune."""

from __future__ import annotations

import os
import threading
import time

import pytest

from compile_cache import KeyLock, LockTimeout
from cc_helpers import make_key


def test_exclusive_and_try_once(tmp_path):
    p = tmp_path / "k.lock"
    a, b = KeyLock(p), KeyLock(p)
    assert a.acquire(timeout=0)
    assert not b.acquire(timeout=0)
    t0 = time.monotonic()
    assert not b.acquire(timeout=0.2)
    assert time.monotonic() - t0 >= 0.15
    a.release()
    assert b.acquire(timeout=0)
    assert p.read_text().strip() == str(os.getpid())  # holder pid, for "waiting for pid N"
    b.release()


def test_waiter_survives_lock_file_deletion(tmp_path):
    """A waiter must never end up holding a lock on an unlinked inode."""
    p = tmp_path / "k.lock"
    holder = KeyLock(p)
    holder.acquire()
    got = []

    def wait():
        w = KeyLock(p)
        w.acquire(timeout=5)
        got.append(os.fstat(w._fd).st_ino)
        time.sleep(0.2)
        w.release()

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.1)
    holder.unlink_and_release()  # what prune does
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got and os.stat(p).st_ino == got[0]   # the waiter holds the file that exists now
    assert not KeyLock(p).acquire(timeout=0)     # so a newcomer is still excluded
    t.join()


def test_get_or_build_lock_timeout(cache, key):
    cache.root.mkdir(parents=True)
    with KeyLock(cache.root / f"{key.short()}.lock"):
        with pytest.raises(LockTimeout, match="another process is compiling"):
            cache.get_or_build(key, lambda tmp: pytest.fail("must not build"), lock_timeout=0.1)


def test_threads_build_once(cache):
    key = make_key(dtype="float32")
    calls = []

    def build(tmp):
        calls.append(1)
        time.sleep(0.3)
        (tmp / "a.bin").write_bytes(b"a")

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_build(key, build).path)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and len(set(results)) == 1 and len(results) == 4
