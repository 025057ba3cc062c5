"""Fault injection for the tensor-parallel tests: a worker hook that fails on cue.

Passed as ``Engine(..., extra={"tp_worker_hook": Fault(...)})``; every worker calls it before each
op (``"load"``, ``"execute"``, set-up ops). It is pickled into the spawned workers, which import
this module by name (spawn hands them the parent's ``sys.path``).
"""

from __future__ import annotations

import dataclasses
import os
import time


@dataclasses.dataclass
class Fault:
    """Fail rank ``rank`` at the ``at``-th ``op``: ``kind`` is "raise", "exit" or "hang"."""

    op: str = "execute"
    rank: int = 1
    at: int = 1
    kind: str = "raise"
    code: int = 7  # exit code for kind="exit"
    seen: int = 0  # ops of this kind seen so far (each worker has its own copy)

    def __call__(self, rank: int, op: str) -> None:
        if rank != self.rank or op != self.op:
            return
        self.seen += 1
        if self.seen != self.at:
            return
        if self.kind == "exit":
            os._exit(self.code)
        if self.kind == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected fault in rank {rank} at {op} #{self.seen} (tests/parallel/faults.py)")
