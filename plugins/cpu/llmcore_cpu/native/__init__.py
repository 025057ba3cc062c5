"""The native CPU decode step: ``decode.cpp`` built at first use and called through ctypes.

A decode batch (every sequence one token) runs as one foreign call that does every layer:
the weights are read where the torch model holds them (no copy of a weight matrix), the KV
cache is the runner's, and the result is the float32 logits the sampler takes. Prefill and
mixed batches run the same layers (:meth:`NativeDecode.forward_rows`); prompt logprobs stay on
the torch path. Projection weights the panel
kernels cover (:func:`panel_kinds`: bf16 and int8 with AVX-512, float32 and int8 with AVX2) are
repacked in place into 16-row panels (:func:`pack_panels`, decode.cpp "packed weights") and
their modules become :class:`PanelLinear`, which runs the same native product for the torch
path (prefill): one copy of each weight, read as sequential streams. The torch path's attention
runs on the step's paged-attention kernel too (:class:`NativePagedAttention`). Why a kernel of our own:
docs/benchmarks.md ("native decode") has the measurements; in short, torch's bf16/int8
matrix-vector products reach a third to a half of the memory bandwidth a decode step is
bound by, and the step pays ~20 dispatches per layer.

Kernels: AVX-512 (BF16 dot products and VNNI where present, weights in 16-row panels) or AVX2
+ FMA (float32 weights in 16-row panels with a 6 x 16 outer-product tile; bf16 and int8
8-lane tiles over row-major weights); other CPUs get portable loops, which the engine uses
only when ``LLMCORE_CPU_NATIVE=1`` asks.

Build: ``g++ -O3 -march=native -fopenmp`` (about 2 s), cached under
``$XDG_CACHE_HOME/llmcore/native/<hash of source, compiler, CPU flags>/``. The library links
the OpenMP runtime torch already loaded (same soname), so the two share one thread pool.
No compiler, a failed build or a model the step does not cover: the engine logs why and
uses the torch path, which gives the same tokens up to float rounding.

Covered: the Llama-family models of :mod:`llmcore.models.llama` (biases, Qwen3 q/k norms,
GQA, tied or separate output projection), float32 or bfloat16, unquantized, ``eetq`` (int8
per channel, int8 output projection and embedding), ``int4`` and ``awq`` (4-bit groups, read
out of torch's int4pack tensors into the step's layout by :func:`q4_from_int4`; the modules
become :class:`Q4Linear`). Not covered (torch path): bitsandbytes layers, tensor parallelism,
float16.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from llmcore.models.llama import LlamaForCausalLM
from llmcore.quantization.awq import Int4Linear
from llmcore.quantization.int8 import Int8Embedding, Int8Linear
from llmcore.runtime.attention import TorchPagedAttention
from llmcore_cpu.cpuinfo import cpu_id
from llmcore_cpu.toolchain import ISA_FLAGS, find_compiler, isa_setting, native_setting

log = logging.getLogger("llmcore.cpu")

SOURCE = Path(__file__).with_name("decode.cpp")
KIND_F32, KIND_BF16, KIND_I8, KIND_Q4 = 0, 1, 2, 3
ERRORS = {-1: "head_dim > 512, odd head_dim or block_size > 256", -2: "token id outside the vocabulary",
          -3: "position beyond the RoPE table (max_model_len)", -4: "context length outside the block table",
          -5: "a row's sequence outside the block tables", -6: "logit rows not increasing row indices"}


class NativeUnavailable(RuntimeError):
    """The native step cannot run here or for this model; the message says why."""


# ------------------------------------------------------------------ the library


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "llmcore" / "native"


def _compiler() -> str:
    cxx = find_compiler()
    if not cxx:
        raise NativeUnavailable("no C++ compiler found (install g++, or set CXX)")
    return cxx


def library() -> ctypes.CDLL:
    """The built library (built once per source, compiler, CPU and ``LLMCORE_CPU_ISA``; then
    loaded from disk)."""
    if native_setting() == "off":
        raise NativeUnavailable("disabled by LLMCORE_CPU_NATIVE=0")
    try:
        isa = isa_setting()
    except ValueError as exc:
        raise NativeUnavailable(str(exc)) from exc
    return _library(isa)


@functools.lru_cache(maxsize=None)
def _library(isa: str) -> ctypes.CDLL:
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"{cxx} does not run: {exc}") from exc
    flags = ["-O3", "-march=native", *ISA_FLAGS[isa], "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + cpu_id().encode()
                         + " ".join(flags).encode()).hexdigest()[:16]
    out = cache_dir() / key / "libllmcore_cpu_native.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            proc = subprocess.run([cxx, *flags, "-o", str(tmp_out), str(SOURCE)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise NativeUnavailable(f"building {SOURCE.name} with {cxx} failed: "
                                        f"{proc.stderr.strip()[-2000:]}")
            os.replace(tmp_out, out)  # atomic: a concurrent build leaves one whole file
        log.info("built the native CPU decode step in %.1f s (%s)", time.perf_counter() - t0, out)
    lib = ctypes.CDLL(str(out))
    lib.llmcore_decode_step.restype = ctypes.c_int
    lib.llmcore_decode_step.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    lib.llmcore_forward_rows.restype = ctypes.c_int
    lib.llmcore_forward_rows.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    lib.llmcore_linear.restype = ctypes.c_int
    lib.llmcore_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int32]
    lib.llmcore_attention.restype = ctypes.c_int
    lib.llmcore_attention.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.llmcore_prefill_attention.restype = ctypes.c_int
    lib.llmcore_prefill_attention.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    lib.llmcore_native_features.restype = ctypes.c_int
    lib.llmcore_q4_integer_rows.restype = ctypes.c_int
    lib.llmcore_struct_layout.restype = ctypes.c_char_p
    return lib


def features() -> dict[str, bool]:
    f = library().llmcore_native_features()
    return {"avx512": bool(f & 1), "avx512_bf16": bool(f & 2), "avx512_vnni int8": bool(f & 4), "avx2": bool(f & 8)}


def q4_integer_rows() -> int:
    """Batch rows up to which this build's 4-bit products quantize the activations to int8 per
    block of 32 (llama.cpp's Q4_1 x Q8 scheme); more rows are dequantized and multiplied in float32.
    2 (single-stream decode) in general, 64 with AVX-512 VNNI (prefill chunks and batched decode)."""
    return int(library().llmcore_q4_integer_rows())


def int8_activations() -> bool:
    """Whether int8 (eetq) weights in panels multiply more than two batch rows as int8 activations
    per block of 64 (AVX-512 VNNI; ``LLMCORE_CPU_INT8_ACTIVATIONS``: 1, the default, or 0 to keep
    int16 activations per row at half the speed)."""
    value = os.environ.get("LLMCORE_CPU_INT8_ACTIVATIONS", "1")
    if value not in ("0", "1"):
        raise NativeUnavailable(f"LLMCORE_CPU_INT8_ACTIVATIONS={value!r}: use 1 (int8 activations per block of "
                                "64 at more than two batch rows, the default) or 0 (int16 per row)")
    return value == "1"


def native_prompts() -> bool:
    """Whether steps with prompt rows run through the native layers too (``NativeDecode.forward_rows``;
    ``LLMCORE_CPU_NATIVE_PROMPTS``: 1, the default, or 0 for the torch forward on the native
    products and attention). Steps that want prompt logprobs take the torch forward either way."""
    value = os.environ.get("LLMCORE_CPU_NATIVE_PROMPTS", "1")
    if value not in ("0", "1"):
        raise NativeUnavailable(f"LLMCORE_CPU_NATIVE_PROMPTS={value!r}: use 1 (prompt rows through the native "
                                "layers, the default) or 0 (the torch forward)")
    return value == "1"


def vector_kernels() -> bool:
    """Whether the build has vector kernels (AVX-512, or AVX2 + FMA), not only the portable loops."""
    feats = features()
    return feats["avx512"] or feats["avx2"]


# ------------------------------------------------------------------ structs (mirror decode.cpp)

P = ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("w", P), ("scale", P), ("bias", P), ("rowsum", P), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("kind", ctypes.c_int32), ("packed", ctypes.c_int32), ("groups", P), ("group", ctypes.c_int32),
                ("group_kind", ctypes.c_int32), ("bsum", P)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("in_norm", P), ("post_norm", P), ("q_norm", P), ("k_norm", P),
                ("k_cache", P), ("v_cache", P)]


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("hidden", "n_heads", "n_kv_heads", "head_dim", "inter",
                                               "vocab", "n_layers", "block_size", "max_pos")] + [
        ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float),
        ("cache_kind", ctypes.c_int32), ("round_bf16", ctypes.c_int32),
        ("embed", P), ("embed_scale", P), ("embed_kind", ctypes.c_int32), ("embed_packed", ctypes.c_int32),
        ("final_norm", P), ("lm_head", _Linear), ("rope_cos", P), ("rope_sin", P), ("layers", P)]


class _Work(ctypes.Structure):
    _fields_ = [("x", P), ("qkv", P), ("att", P), ("act", P), ("h", P), ("scratch", P),
                ("att_h", P), ("act_h", P), ("hh", P)]


_KINDS = {torch.float32: KIND_F32, torch.bfloat16: KIND_BF16, torch.int8: KIND_I8}


class _Keep:
    """Holds the float32 copies (norms, biases, scales, RoPE tables) the structs point into, and
    the 4-bit weights converted to the step's layout (``q4``: by id of the module they replace)."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.q4: dict[int, tuple[_Linear, torch.Tensor, torch.Tensor]] = {}

    def f32(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach().float().contiguous()
        self.tensors.append(t)
        return t.data_ptr()

    def rowsum(self, w: torch.Tensor) -> int | None:
        """Per-row sums of an int8 weight (the int8 kernel's correction term), else None."""
        if w.dtype != torch.int8:
            return None
        t = w.sum(dim=1, dtype=torch.int32).contiguous()
        self.tensors.append(t)
        return t.data_ptr()

    def block_sums(self, w: torch.Tensor) -> int | None:
        """For a row-major int8 weight [n, k] about to be packed, where this build multiplies int8
        panels by int8 activations per block of 64 (AVX-512 VNNI, k % 64 == 0): 128 x the sum of
        each block of 64 of a row, in panel order [n/16][k/64][16] (decode.cpp ptile_i8q's
        correction term, ``Linear.bsum``); else None."""
        n, k = w.shape
        if w.dtype != torch.int8 or k % 64 or n % PANEL or not features()["avx512_vnni int8"]:
            return None
        if not int8_activations():
            return None
        t = (w.view(n // PANEL, PANEL, k // 64, 64).sum(-1, dtype=torch.int32) * 128).transpose(1, 2).contiguous()
        self.tensors.append(t)
        return t.data_ptr()


Q4_BLOCK = 32


@functools.lru_cache(maxsize=8)
def _int4pack_sources(n: int, k: int) -> torch.Tensor:
    """For each nibble of torch's CPU int4pack layout of an [n, k] weight (each byte's low nibble,
    then its high one), the flat index ``r * k + c`` of the element it holds.

    The layout is private to torch's kernel (it tiles rows by the CPU's vector width), so it is
    read off the kernel's own packing: the index of every element, written in base 16, packed
    one digit at a time."""
    index = torch.arange(n * k, dtype=torch.int64)
    sources = torch.zeros(n * k, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(n * k, 16)))):
        q = ((index >> (4 * digit)) & 15).to(torch.int32).view(n, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1).view(torch.uint8).flatten()
        if packed.numel() * 2 != n * k:
            raise NativeUnavailable(f"torch's int4pack of a {n} x {k} weight is {packed.numel()} bytes, "
                                    f"not {n * k // 2}: a layout this plugin does not read")
        sources |= torch.stack([packed & 15, packed >> 4], 1).flatten().to(torch.int64) << (4 * digit)
    if not torch.equal(torch.sort(sources).values, index):
        raise NativeUnavailable(f"torch's int4pack layout of a {n} x {k} weight is not a permutation")
    return sources


def q4_from_int4(module: Int4Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """An :class:`Int4Linear`'s weights in the step's 4-bit layout (decode.cpp "4-bit groups"), in
    the same bytes: rows in tiles of four, nibbles [n/4, k/32, 4, 16] uint8 (per block of 32
    elements, each row's 16 bytes: byte i holds element i low and 16 + i high) and torch's own
    (scale, zero) pairs in the model's dtype [n/4, k/group, 2, 4] (per group, the four rows' scales
    then their zeros), W = (q - 8) * scale + zero as in torch's kernel. :func:`q4_rows` reads them
    back row-major.

    q is read out of torch's int4pack tensor by :func:`_int4pack_sources`, and checked: the
    product of a few random rows through torch's kernel and through these weights must agree."""
    n, k, g = module.out_features, module.in_features, module.group_size
    packed = module.packed.view(torch.uint8).flatten()
    q = torch.empty(n * k, dtype=torch.uint8)
    q[_int4pack_sources(n, k)] = torch.stack([packed & 15, packed >> 4], 1).flatten()
    q = q.view(n, k)
    groups = module.scales_and_zeros.permute(1, 0, 2).contiguous()  # [n, k/g, 2]: scale, offset + 8 * scale
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(0))
    want = torch._weight_int4pack_mm_for_cpu(x, module.packed, g, module.scales_and_zeros.float().contiguous())
    err = float((x @ q4_dequantize(q, groups).t() - want).abs().max())
    if not err <= 1e-4 * float(want.abs().max()) + 1e-6:
        raise NativeUnavailable(f"4-bit weights of a {n} x {k} layer did not read back (max error {err:.3g}): "
                                "this torch's int4pack layout is not the one expected")
    blocks = q.reshape(n, k // Q4_BLOCK, 2, Q4_BLOCK // 2)
    nibbles = (blocks[:, :, 0] | (blocks[:, :, 1] << 4))  # [n, k/32, 16]
    nibbles = nibbles.view(n // 4, 4, k // Q4_BLOCK, Q4_BLOCK // 2).transpose(1, 2).contiguous()
    return nibbles, groups.view(n // 4, 4, k // g, 2).permute(0, 2, 3, 1).contiguous()


def q4_rows(nibbles: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-major q [n, k] (uint8, 0..15) and groups [n, k/group, 2] of :func:`q4_from_int4`'s
    tiles (copies)."""
    nt, nb, _, half = nibbles.shape
    b = nibbles.transpose(1, 2).reshape(nt * 4, nb, half)
    q = torch.stack([b & 15, b >> 4], 2).reshape(nt * 4, nb * 2 * half)
    return q, groups.permute(0, 3, 1, 2).reshape(nt * 4, groups.shape[1], 2)


def q4_dequantize(q: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """W = (q - 8) * scale + zero, float32 [n, k], from q [n, k] and groups [n, k/g, 2]."""
    n, k = q.shape
    gf = groups.float()
    return ((q.view(n, gf.shape[1], -1).float() - 8) * gf[..., :1] + gf[..., 1:]).view(n, k)


def _linear(module: nn.Module, keep: _Keep, what: str) -> _Linear:
    if isinstance(module, Int4Linear):
        if (module.kernel != "int4pack" or module.group_size % Q4_BLOCK or module.in_features % module.group_size
                or module.out_features % 4
                or module.scales_and_zeros.dtype not in (torch.float32, torch.bfloat16)):
            raise NativeUnavailable(f"{what} is a 4-bit layer the step does not read (kernel {module.kernel}, "
                                    f"group size {module.group_size}: groups of a multiple of 32 on the CPU)")
        nibbles, groups = q4_from_int4(module)
        keep.tensors += [nibbles, groups]
        L = _Linear(nibbles.data_ptr(), None, keep.f32(module.bias), None, module.out_features,
                    module.in_features, KIND_Q4, 0, groups.data_ptr(), module.group_size, _KINDS[groups.dtype])
        keep.q4[id(module)] = (_Linear.from_buffer_copy(L), nibbles, groups)  # for the module swap
        return L
    if type(module) is nn.Linear:  # not a subclass: bitsandbytes' layers are nn.Linear with packed weights
        w, scale = module.weight.detach(), None
        if w.dtype not in (torch.float32, torch.bfloat16):
            raise NativeUnavailable(f"{what} has {w.dtype} weights (float32 or bfloat16 only)")
    elif isinstance(module, Int8Linear) and module.kernel in ("int8pack", "dequant"):
        w, scale = module.weight, module.scale
    else:
        raise NativeUnavailable(f"{what} is a {type(module).__name__} "
                                f"({getattr(module, 'kernel', 'no native kernel')})")
    if not w.is_contiguous():
        raise NativeUnavailable(f"{what}'s weight is not contiguous")
    keep.tensors.append(w)
    n, k = w.shape
    return _Linear(w.data_ptr(), keep.f32(scale), keep.f32(getattr(module, "bias", None)), keep.rowsum(w),
                   n, k, _KINDS[w.dtype], 0)


def check_model(model: nn.Module) -> None:
    """Raise :class:`NativeUnavailable` (with the reason) if the native step cannot run ``model``."""
    if not isinstance(model, LlamaForCausalLM):
        raise NativeUnavailable(f"{type(model).__name__} is not a Llama-family model of llmcore.models.llama")
    if getattr(model, "tp", None) is not None:
        raise NativeUnavailable("tensor parallel ranks need an all-reduce inside the step")
    dtype = model.model.norm.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise NativeUnavailable(f"dtype {dtype} (float32 or bfloat16 only)")
    if model.config.head_dim > 512 or model.config.head_dim % 2:
        raise NativeUnavailable(f"head_dim {model.config.head_dim}")


# ------------------------------------------------------------------ panel-packed weights

PANEL = 16
_GROUP = {KIND_F32: 1, KIND_BF16: 2, KIND_I8: 4}  # k elements per 32-bit lane of a panel vector


def panel_kinds() -> set[torch.dtype]:
    """The weight dtypes this build's panel kernels cover: AVX-512 bfloat16 (and int8 with VNNI),
    AVX2 + FMA float32 and int8 (decode.cpp "packed weights"); none with the portable loops."""
    feats = features()
    if feats["avx512"]:
        return {torch.bfloat16} | ({torch.int8} if feats["avx512_vnni int8"] else set())
    return {torch.float32, torch.int8} if feats["avx2"] else set()


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """Repack ``w`` [n, k] in place into panels [n/16][k/g][16][g] (g = 1 for float32, 2 for bf16,
    4 for int8): one vector holds a k-group of 16 rows. Returns the panel view of the same storage."""
    n, k = w.shape
    g = _GROUP[_KINDS[w.dtype]]
    panels = w.view(n // PANEL, PANEL, k // g, g).permute(0, 2, 1, 3).contiguous()  # one tensor's temporary
    w.view(-1).copy_(panels.view(-1))
    return w.view(n // PANEL, k // g, PANEL, g)


def unpack_panels(panels: torch.Tensor) -> torch.Tensor:
    """The row-major [n, k] weight of a :func:`pack_panels` view (a copy)."""
    np_, kg, p, g = panels.shape
    return panels.permute(0, 2, 1, 3).reshape(np_ * p, kg * g)


def _packable(L: _Linear, rows_per_half: bool = False) -> bool:
    """Whether the panel kernels cover ``L`` (rows_per_half: gate/up, packed as two halves)."""
    kind = L.kind
    if L.packed or kind not in {_KINDS[d] for d in panel_kinds()}:
        return False
    half = L.n // 2 if rows_per_half else L.n
    return L.n % PANEL == 0 and half % PANEL == 0 and L.k % _GROUP[kind] == 0


def _mark_packed(L: _Linear) -> _Linear:
    """Set ``L`` (a field of the step's structs) packed; return a copy for the module's own calls."""
    L.packed = 1
    return _Linear.from_buffer_copy(L)


class _NativeProduct(nn.Module):
    """A projection the torch path (prefill, mixed batches) runs through the native step's own
    product (``llmcore_linear``) on the weights the step reads, so no second copy is kept."""

    kernel = "native"

    def __init__(self, lib: ctypes.CDLL, struct: _Linear, keep: list[torch.Tensor], threads: int | None) -> None:
        super().__init__()
        self.lib, self.struct, self.threads = lib, struct, threads
        self.out_features, self.in_features = int(struct.n), int(struct.k)
        self._keep = keep  # float32 copies the struct points into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xf = x2.float().contiguous() if self.struct.kind != KIND_BF16 else None
        xh = x2.to(torch.bfloat16).contiguous().view(torch.int16) if self.struct.kind == KIND_BF16 else None
        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        if x2.shape[0] == 0:
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        rc = self.lib.llmcore_linear(ctypes.addressof(self.struct), x2.shape[0],
                                     None if xf is None else xf.data_ptr(), None if xh is None else xh.data_ptr(),
                                     y.data_ptr(), self.threads or torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native product refused its input ({rc})")
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class PanelLinear(_NativeProduct):
    """A projection whose weight :class:`NativeDecode` has repacked into panels, in place.
    ``unpacked_weight()`` gives the row-major weight back (a copy)."""

    kernel = "native-panels"

    def __init__(self, lib: ctypes.CDLL, struct: _Linear, panels: torch.Tensor, scale: torch.Tensor | None,
                 bias: torch.Tensor | None, keep: list[torch.Tensor], threads: int | None) -> None:
        super().__init__(lib, struct, keep, threads)
        self.register_buffer("weight", panels, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def unpacked_weight(self) -> torch.Tensor:
        return unpack_panels(self.weight)

    def extra_repr(self) -> str:
        kind = {KIND_F32: "float32", KIND_BF16: "bfloat16", KIND_I8: "int8"}[self.struct.kind]
        return f"in={self.in_features}, out={self.out_features}, {kind} in 16-row panels (native)"


class Q4Linear(_NativeProduct):
    """A 4-bit :class:`~llmcore.quantization.awq.Int4Linear` (``int4``, ``awq``) in the native
    step's layout (:func:`q4_from_int4`); it replaces the torch int4pack module, whose buffers go."""

    kernel = "native-4bit"

    def __init__(self, lib: ctypes.CDLL, struct: _Linear, nibbles: torch.Tensor, groups: torch.Tensor,
                 bias: torch.Tensor | None, keep: list[torch.Tensor], threads: int | None) -> None:
        super().__init__(lib, struct, keep, threads)
        self.group_size = int(struct.group)
        self.register_buffer("nibbles", nibbles, persistent=False)
        self.register_buffer("groups", groups, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def dequantized_weight(self) -> torch.Tensor:
        """W = (q - 8) * scale + zero, [out_features, in_features] float32 (a copy)."""
        return q4_dequantize(*q4_rows(self.nibbles, self.groups))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, 4-bit groups of {self.group_size} "
                f"(native)")


class PanelEmbedding(nn.Module):
    """The token embedding of a tied output projection that :class:`NativeDecode` has packed into
    panels: rows gathered from the panels (one table for both, as before)."""

    def __init__(self, panels: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", panels, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.dtype = dtype
        self.embedding_dim = panels.shape[1] * panels.shape[3]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids // PANEL, :, ids % PANEL, :].reshape(*ids.shape, self.embedding_dim)
        if self.scale is None:
            return rows
        return (rows.to(self.dtype) * self.scale[ids].unsqueeze(-1)).to(self.dtype)


class NativePagedAttention(TorchPagedAttention):
    """The torch path's attention (prefill and mixed steps) on the decode step's kernels.

    New K/V go into the cache as in :class:`TorchPagedAttention`; then every prompt row attends to
    its sequence's cached positions up to its own (``llmcore_prefill_attention``: one task per
    row and KV head, the paged-attention kernel of the decode step, float32 accumulation), in
    place of a gather and one SDPA call per sequence. Decode-only batches and caches the kernels
    do not cover go to the torch reference."""

    name = "native"

    def __init__(self, lib: ctypes.CDLL, threads: int | None) -> None:
        self.lib, self.threads = lib, threads

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        num_blocks, bs, kvh, d = k_cache.shape
        if (meta.decode_only or k_cache.dtype not in (torch.float32, torch.bfloat16) or d > 512 or d % 2
                or bs > 256 or bs & (bs - 1) or q.shape[1] % kvh):
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        k_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)
        rows = meta.extra.get("native_prefill_rows")
        if rows is None:  # once per step, for every layer
            width = max(len(t) for t in meta.block_tables)
            tables = torch.zeros(len(meta.block_tables), width, dtype=torch.int64)
            for i, t in enumerate(meta.block_tables):
                tables[i, :len(t)] = torch.tensor(t, dtype=torch.int64)
            seq = torch.repeat_interleave(torch.arange(len(meta.query_lens)), torch.tensor(meta.query_lens))
            ctx = torch.cat([torch.arange(cl - ql + 1, cl + 1) for ql, cl in zip(meta.query_lens, meta.context_lens)])
            rows = meta.extra["native_prefill_rows"] = (tables, seq.contiguous(), ctx.to(torch.int64).contiguous())
        tables, seq, ctx = rows
        M = _Model(head_dim=d, n_kv_heads=kvh, block_size=bs, attn_scale=scale,
                   cache_kind=_KINDS[k_cache.dtype])
        L = _Layer(k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr())
        qf = q.float().contiguous()
        out = torch.empty_like(qf)
        rc = self.lib.llmcore_prefill_attention(ctypes.addressof(M), ctypes.addressof(L), qf.data_ptr(),
                                                q.shape[0], q.shape[1], tables.data_ptr(), tables.shape[1],
                                                seq.data_ptr(), ctx.data_ptr(), out.data_ptr(),
                                                self.threads or torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native prefill attention refused its input: {ERRORS.get(rc, rc)}")
        return out.to(q.dtype)


class NativeDecode:
    """``decode_graph`` for :class:`~llmcore.runtime.runner.TorchModelRunner` (see the runner):
    decode steps (``__call__``) and, unless ``LLMCORE_CPU_NATIVE_PROMPTS=0``, steps with prompt
    rows (:meth:`forward_rows`)."""

    #: rows per foreign call of :meth:`forward_rows` (work buffers: ~27 KB a row for SmolLM2)
    ROW_SLICE = 1024

    def __init__(self, model: nn.Module, block_size: int, threads: int | None = None, pack: bool = True) -> None:
        check_model(model)
        self.lib = library()
        self.model = model
        self.threads = threads
        cfg = model.config
        keep = self.keep = _Keep()
        layers = (_Layer * cfg.num_layers)()
        for i, layer in enumerate(model.model.layers):
            a, m = layer.self_attn, layer.mlp
            L = layers[i]
            L.qkv = _linear(a.qkv_proj, keep, f"layer {i} qkv_proj")
            L.o = _linear(a.o_proj, keep, f"layer {i} o_proj")
            L.gate_up = _linear(m.gate_up_proj, keep, f"layer {i} gate_up_proj")
            L.down = _linear(m.down_proj, keep, f"layer {i} down_proj")
            L.in_norm = keep.f32(layer.input_layernorm.weight)
            L.post_norm = keep.f32(layer.post_attention_layernorm.weight)
            L.q_norm = keep.f32(a.q_norm.weight if a.q_norm is not None else None)
            L.k_norm = keep.f32(a.k_norm.weight if a.k_norm is not None else None)
        self.layers = layers
        dtype = model.model.norm.weight.dtype
        emb = model.model.embed_tokens
        if isinstance(emb, Int8Embedding):
            e_w, e_scale, e_kind = emb.weight, keep.f32(emb.scale), KIND_I8
        elif isinstance(emb, nn.Embedding) and emb.weight.dtype in (torch.float32, torch.bfloat16):
            e_w, e_scale, e_kind = emb.weight.detach(), None, _KINDS[emb.weight.dtype]
        else:
            raise NativeUnavailable(f"embedding is a {type(emb).__name__}")
        keep.tensors.append(e_w)
        if model.logits_proj is not None:
            head = _linear(model.logits_proj, keep, "output projection")
        elif model.lm_head is not None:
            head = _linear(model.lm_head, keep, "lm_head")
        else:
            w = model.model.embed_tokens.weight
            if not isinstance(emb, nn.Embedding):
                raise NativeUnavailable("tied output projection of a quantized embedding without its own head")
            head = _Linear(w.data_ptr(), None, None, None, w.shape[0], w.shape[1], _KINDS[w.dtype], 0)
        if model.rope_cos is None:
            raise NativeUnavailable("RoPE tables not initialised")
        self.vocab = head.n
        self.struct = _Model(
            hidden=cfg.hidden_size, n_heads=cfg.num_heads, n_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            inter=cfg.intermediate_size, vocab=head.n, n_layers=cfg.num_layers, block_size=block_size,
            max_pos=model.rope_cos.shape[0], eps=cfg.rms_norm_eps, attn_scale=cfg.head_dim ** -0.5,
            cache_kind=_KINDS[dtype], round_bf16=int(dtype == torch.bfloat16),
            embed=e_w.data_ptr(), embed_scale=e_scale, embed_kind=e_kind, embed_packed=0,
            final_norm=keep.f32(model.model.norm.weight), lm_head=head,
            rope_cos=keep.f32(model.rope_cos), rope_sin=keep.f32(model.rope_sin),
            layers=ctypes.cast(layers, P))
        if cfg.num_heads % cfg.num_kv_heads:
            raise NativeUnavailable("num_heads is not a multiple of num_kv_heads")
        self.q4_layers = self._swap_q4(model)
        self.packed = self._pack(model, e_w) if pack else 0
        self._caches_key: tuple | None = None
        self._work: dict[str, torch.Tensor] = {}
        self._work_rows = self._work_threads = 0
        self._no_rows = torch.zeros(1, dtype=torch.long)  # out_rows of a slice with no logit rows
        self.calls = 0

    def _swap_q4(self, model: nn.Module) -> int:
        """Replace every 4-bit module the structs read in the step's layout with a :class:`Q4Linear`
        on those tensors (torch's int4pack copy goes). Returns how many."""
        done = 0
        owners = [(layer.self_attn, ("qkv_proj", "o_proj")) for layer in model.model.layers]
        owners += [(layer.mlp, ("gate_up_proj", "down_proj")) for layer in model.model.layers]
        owners.append((model, ("logits_proj", "lm_head")))
        for owner, attrs in owners:
            for attr in attrs:
                module = getattr(owner, attr, None)
                if id(module) not in self.keep.q4:
                    continue
                struct, nibbles, groups = self.keep.q4.pop(id(module))
                bias = None if module.bias is None else module.bias.detach()
                setattr(owner, attr, Q4Linear(self.lib, struct, nibbles, groups, bias, self.keep.tensors,
                                              self.threads))
                done += 1
        return done

    def _pack(self, model: nn.Module, embed_weight: torch.Tensor) -> int:
        """Repack every projection the panel kernels cover, in place, and swap its module for a
        :class:`PanelLinear` (done last: every check above has passed). Returns how many."""
        done = 0

        def swap(owner, attr, L, gate_up=False):
            nonlocal done
            module = getattr(owner, attr)
            if not _packable(L, gate_up):
                return
            L.bsum = self.keep.block_sums(module.weight.detach())
            panels = pack_panels(module.weight.detach())
            bias = getattr(module, "bias", None)
            bias = None if bias is None else bias.detach()
            setattr(owner, attr, PanelLinear(self.lib, _mark_packed(L), panels, getattr(module, "scale", None),
                                             bias, self.keep.tensors, self.threads))
            done += 1

        for i, layer in enumerate(model.model.layers):
            a, m, L = layer.self_attn, layer.mlp, self.layers[i]
            swap(a, "qkv_proj", L.qkv)
            swap(a, "o_proj", L.o)
            swap(m, "gate_up_proj", L.gate_up, gate_up=True)
            swap(m, "down_proj", L.down)
        head, emb = self.struct.lm_head, model.model.embed_tokens
        tied = head.w == embed_weight.data_ptr()
        if not tied and model.logits_proj is not None:
            swap(model, "logits_proj", head)
        elif not tied and model.lm_head is not None:
            swap(model, "lm_head", head)
        elif tied and _packable(head):
            # one table for the embedding (rows) and the output projection (panels): pack it and
            # read rows out of the panels (decode.cpp embed_packed, PanelEmbedding)
            scale = getattr(emb, "scale", None)
            head.bsum = self.keep.block_sums(embed_weight)
            panels = pack_panels(embed_weight)
            self.struct.embed_packed = 1
            model.logits_proj = PanelLinear(self.lib, _mark_packed(head), panels, scale, None, self.keep.tensors,
                                            self.threads)
            model.model.embed_tokens = PanelEmbedding(panels, scale, getattr(emb, "dtype", embed_weight.dtype))
            done += 1
        return done

    def _bind_caches(self, kv_caches) -> None:
        # the runner builds a new list when it reallocates (held here, so its id is not reused)
        key = (kv_caches, len(kv_caches), kv_caches[0][0].data_ptr() if kv_caches else 0)
        if self._caches_key is not None and key[0] is self._caches_key[0] and key[1:] == self._caches_key[1:]:
            return
        dtype = self.model.model.norm.weight.dtype
        for i, (k, v) in enumerate(kv_caches):
            if k.dtype != dtype or not (k.is_contiguous() and v.is_contiguous()):
                raise NativeUnavailable(f"KV cache of layer {i} is {k.dtype}, expected contiguous {dtype}")
            self.layers[i].k_cache = k.data_ptr()
            self.layers[i].v_cache = v.data_ptr()
        self._caches_key = key

    def _buffers(self, rows: int, threads: int) -> _Work:
        if rows > self._work_rows or threads > self._work_threads:
            cfg = self.model.config
            h, att, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size
            qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
            e, bf = torch.empty, torch.int16
            self._work = dict(x=e(rows, h), qkv=e(rows, qkv), att=e(rows, att), act=e(rows, inter),
                              h=e(threads, rows, h), scratch=e(threads, rows, 128), att_h=e(rows, att, dtype=bf),
                              act_h=e(rows, inter, dtype=bf), hh=e(threads, rows, h, dtype=bf))
            self._work_rows, self._work_threads = rows, threads
            self._work_struct = _Work(**{k: v.data_ptr() for k, v in self._work.items()})
        return self._work_struct

    def __call__(self, input_ids, positions, meta, kv_caches) -> torch.Tensor:
        self._bind_caches(kv_caches)
        b = input_ids.shape[0]
        tables = meta.block_table_tensor
        ids, pos = input_ids.contiguous(), positions.contiguous()
        slots, lens = meta.slot_mapping.contiguous(), meta.context_lens_tensor.contiguous()
        tables = tables.contiguous()
        logits = torch.empty(b, self.vocab, dtype=torch.float32)
        threads = self.threads or torch.get_num_threads()
        work = self._buffers(b, threads)
        rc = self.lib.llmcore_decode_step(
            ctypes.addressof(self.struct), b, ids.data_ptr(), pos.data_ptr(), slots.data_ptr(),
            tables.data_ptr(), tables.shape[1], lens.data_ptr(), ctypes.addressof(work), logits.data_ptr(),
            threads)
        if rc != 0:
            raise RuntimeError(f"native decode step refused its input: {ERRORS.get(rc, rc)}")
        self.calls += 1
        return logits

    def forward_rows(self, input_ids, positions, meta, kv_caches, logit_rows: list[int]) -> torch.Tensor:
        """A step with prompt rows (prefill chunks, alone or mixed with decode rows) through the
        native layers (decode.cpp ``llmcore_forward_rows``): float32 logits [len(logit_rows), vocab]
        for the rows asked for (increasing). Rows go through in slices of at most
        :attr:`ROW_SLICE` (a slice's rows attend to the K/V the slices before it wrote), so the
        work buffers stay bounded whatever the step's token budget."""
        self._bind_caches(kv_caches)
        tables = meta.block_tables
        width = max(len(t) for t in tables)
        table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        row_seq = torch.repeat_interleave(torch.arange(len(tables)), torch.tensor(meta.query_lens))
        ids, pos = input_ids.contiguous(), positions.contiguous()
        slots = meta.slot_mapping.contiguous()
        ctx = pos + 1
        out_rows = torch.tensor(logit_rows, dtype=torch.long)
        logits = torch.empty(len(logit_rows), self.vocab, dtype=torch.float32)
        threads = self.threads or torch.get_num_threads()
        n = ids.shape[0]
        done = 0
        for r0 in range(0, n, self.ROW_SLICE):
            r1 = min(n, r0 + self.ROW_SLICE)
            mine = out_rows[(out_rows >= r0) & (out_rows < r1)] - r0
            n_out = mine.numel()
            # an empty tensor's pointer may be null, which the step reads as "every row"
            rows_ptr = mine.data_ptr() if n_out else self._no_rows.data_ptr()
            work = self._buffers(r1 - r0, threads)
            rc = self.lib.llmcore_forward_rows(
                ctypes.addressof(self.struct), r1 - r0, ids[r0:].data_ptr(), pos[r0:].data_ptr(),
                slots[r0:].data_ptr(), table_t.data_ptr(), width, len(tables), row_seq[r0:].data_ptr(),
                ctx[r0:].data_ptr(), n_out, rows_ptr, ctypes.addressof(work),
                logits[done:].data_ptr() if n_out else None, threads)
            if rc != 0:
                raise RuntimeError(f"native step refused its input: {ERRORS.get(rc, rc)}")
            done += n_out
        self.calls += 1
        return logits


def install(runner, threads: int | None = None, pack: bool | None = None) -> NativeDecode:
    """Give ``runner`` the native decode step; raises :class:`NativeUnavailable` with the reason.

    Without AVX-512 or AVX2 + FMA the build has only the portable loops, which are correct but
    slower than torch's kernels: the step is then used only if ``LLMCORE_CPU_NATIVE=1`` asks for it.
    """
    if not vector_kernels() and native_setting() != "force":
        raise NativeUnavailable("neither AVX-512 nor AVX2+FMA on this CPU: the portable kernels are slower than "
                                "torch's (LLMCORE_CPU_NATIVE=1 uses them anyway)")
    if pack is None:
        pack = os.environ.get("LLMCORE_CPU_PANELS", "1") != "0"
    int8_activations()  # a bad LLMCORE_CPU_INT8_ACTIVATIONS is refused here, before any weight is packed
    prompts = native_prompts()
    runner.decode_graph = NativeDecode(runner.model, runner.block_size, threads, pack)
    runner.backend = runner.model.backend = NativePagedAttention(runner.decode_graph.lib, threads)
    if prompts:
        runner.rows_graph = runner.decode_graph.forward_rows
    return runner.decode_graph
