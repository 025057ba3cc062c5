"""Subprocess helper for compile_cache tests (run as a script, never imported by pytest).

usage: cc_worker.py ROOT MARKER SLEEP [STARTED_FILE]
Runs get_or_build on a fixed key; build_fn appends a line to MARKER, touches
STARTED_FILE, sleeps SLEEP seconds, then writes artifacts. Prints a JSON line.
"""

import json
import os
import sys
import time
from pathlib import Path

from compile_cache import CacheKey, CompileCache

root, marker, sleep = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
started = Path(sys.argv[4]) if len(sys.argv) > 4 else None

key = CacheKey(model_fingerprint="sha256:" + "cd" * 32, plugin="cpu", plugin_version="0.1.0",
               compiler="torch-inductor", compiler_version="2.13.0", dtype="bfloat16",
               static_shapes={"batch_sizes": [1], "max_seq_len": 128})


def build(tmp: Path):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    (tmp / "part1.bin").write_bytes(b"x" * 4096)  # half-written entry if killed now
    if started is not None:
        started.write_text("go")
    time.sleep(sleep)
    (tmp / "part2.bin").write_bytes(b"y" * 4096)
    return {"builder_pid": os.getpid()}


waits = []
entry = CompileCache(root=root).get_or_build(key, build, progress=waits.append)
print(json.dumps({"digest": entry.digest, "path": str(entry.path), "pid": os.getpid(),
                  "builder_pid": entry.metadata.get("builder_pid"), "progress": waits}))
