"""Triton kernels for the CUDA quantized linears. Imported only when a layer runs on CUDA.

* :mod:`.int4_mm` — 4-bit weights in AWQ's packed layout with per-group scale
  and offset (the ``awq`` and ``int4`` methods);
* :mod:`.int8_mm` — int8 per-channel weight-only (the ``eetq`` method without
  the eetq package).

Each has a GEMV path (few rows: decode) that splits K across programs so a
small matrix still fills the GPU, and a GEMM path on ``tl.dot``. Both
accumulate in float32.
"""
