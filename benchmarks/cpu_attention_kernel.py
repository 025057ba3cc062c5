"""The native paged-attention kernel alone (decode.cpp ``attend_any`` through ``llmcore_attention``).

Decode rows over a bf16 (or float32) KV cache whose blocks are scattered as a running engine
scatters them, caches flushed between repeats: one thread, every row and KV head of a step. Prints
the machine, the build (``LLMCORE_CPU_ISA``) and the best and median of the repeats.

    python benchmarks/cpu_attention_kernel.py                       # SmolLM2's shape: 64 rows, 3 KV heads x 3
    LLMCORE_CPU_ISA=avx2 python benchmarks/cpu_attention_kernel.py  # the AVX2 kernels on an AVX-512 CPU
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

import torch

import llmcore_cpu.native as native
from llmcore.bench import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--context", type=int, default=450)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--group", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--cache", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    lib = native.library()
    g = torch.Generator().manual_seed(0)
    per = (a.context + a.block_size - 1) // a.block_size
    nblocks = a.rows * per * 2
    dtype = getattr(torch, a.cache)
    kc = torch.randn(nblocks, a.block_size, a.kv_heads, a.head_dim, generator=g).to(dtype)
    vc = torch.randn(nblocks, a.block_size, a.kv_heads, a.head_dim, generator=g).to(dtype)
    perm = torch.randperm(nblocks, generator=g)
    tables = [perm[i * per:(i + 1) * per].clone().to(torch.int64) for i in range(a.rows)]
    q = torch.randn(a.group, a.head_dim)
    M = native._Model(head_dim=a.head_dim, n_kv_heads=a.kv_heads, block_size=a.block_size,
                      attn_scale=a.head_dim ** -0.5, cache_kind=native._KINDS[dtype])
    L = native._Layer(k_cache=kc.data_ptr(), v_cache=vc.data_ptr())
    out = torch.empty(a.group, a.head_dim)
    flush = torch.empty(64 << 20, dtype=torch.uint8)
    times = []
    for _ in range(a.repeats):
        flush.add_(1)  # evict the K/V from the caches, as the other layers of a step do
        t0 = time.perf_counter()
        for t in tables:
            for h in range(a.kv_heads):
                lib.llmcore_attention(ctypes.addressof(M), ctypes.addressof(L), q.data_ptr(), h, t.data_ptr(),
                                      a.context, out.data_ptr(), a.group)
        times.append(time.perf_counter() - t0)
    times.sort()
    kv_bytes = a.rows * a.context * a.kv_heads * a.head_dim * 2 * kc.element_size()
    print(f"machine: {machine()}; build: {os.environ.get('LLMCORE_CPU_ISA', 'native')} "
          f"({', '.join(k for k, v in native.features().items() if v)}); one thread")
    print(f"{a.rows} rows x {a.kv_heads} KV heads x {a.group} query heads, {a.context} keys, {a.cache} cache "
          f"({kv_bytes / 1e6:.1f} MB of K/V), block size {a.block_size}")
    print(f"best {times[0] * 1e3:.2f} ms ({kv_bytes / times[0] / 1e9:.1f} GB/s), "
          f"median {times[len(times) // 2] * 1e3:.2f} ms")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
