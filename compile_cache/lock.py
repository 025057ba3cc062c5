"""Per-key exclusive lock built on ``fcntl.flock``.

Why flock: the kernel drops the lock when the holder dies (even SIGKILL), so
there are no stale pid files to guess about, and two processes compiling
the same key serialise: the second waits and then finds the finished entry.

Lock files may be deleted by ``prune`` (only while holding them). A waiter
could then hold a lock on an unlinked inode while a newcomer locks a fresh
file of the same name; to rule that out, after acquiring we check that the
path still names the inode we locked and retry if not.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from .errors import CacheError


class LockTimeout(CacheError):
    """The lock was not acquired within the timeout."""


class KeyLock:
    """Exclusive advisory lock on ``path``; use as a context manager.

    ``acquire(timeout=None)`` blocks; ``timeout=0`` tries once. ``on_wait`` is
    called once (with the holder's pid text, maybe "") if we have to wait.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: Optional[float] = None, poll: float = 0.05,
                on_wait: Optional[Callable[[str], None]] = None) -> bool:
        if fcntl is None:  # pragma: no cover
            raise CacheError("compile_cache locking needs fcntl (Linux/macOS)")
        if self._fd is not None:
            raise CacheError(f"lock {self.path} is already held by this object")
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if self._try_flock(fd):
                    if self._same_file(fd):
                        self._fd = fd
                        self._write_owner(fd)
                        return True
                    # Locked a file prune unlinked meanwhile: retry on the new one.
                    os.close(fd)
                    continue
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                if not waited:
                    waited = True
                    if on_wait is not None:
                        on_wait(self._read_owner(fd))
                os.close(fd)
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    @staticmethod
    def _try_flock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)

    @staticmethod
    def _write_owner(fd: int) -> None:
        """Record our pid for diagnostics ("waiting for pid N"); never trusted for correctness."""
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass

    @staticmethod
    def _read_owner(fd: int) -> str:
        try:
            return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return ""

    def unlink_and_release(self) -> None:
        """Delete the lock file while still holding it, then release (safe, see module doc)."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "KeyLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
