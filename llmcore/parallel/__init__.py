"""Running one model over several devices.

* :mod:`llmcore.parallel.validate` (no torch): which tensor-parallel sizes a model and a
  device allow, checked before any weight is loaded.
* :mod:`llmcore.parallel.tensor_parallel`: the transform that turns the single-device
  Llama model into one rank's shard (column-parallel qkv / gate_up, row-parallel o / down
  with an all-reduce), and the sharded weight loading the runner uses.
* :mod:`llmcore.parallel.executor`: one process per rank on one host; rank 0 (the engine's
  process) exposes the ``ModelRunner`` protocol and drives the others every step.

See docs/parallel.md.
"""

from __future__ import annotations

from llmcore.parallel.validate import tensor_parallel_sizes, validate_tensor_parallel

__all__ = ["tensor_parallel_sizes", "validate_tensor_parallel"]
