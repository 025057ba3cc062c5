"""CPU compiled mode: torch.export + AOTInductor graphs for a StaticPlan's fixed shapes.

One graph per compiled shape, each an AOTInductor package (``.pt2``: a shared
library plus its metadata) built by ``torch._inductor.aoti_compile_and_package``:

* ``decode-b{B}.pt2`` for every batch bucket ``B``: one new token for each of
  ``B`` slots;
* ``prefill-s{S}.pt2`` for every sequence bucket ``S``: up to ``S`` prompt
  tokens of one slot (a chunk may start after earlier chunks).

Serving loads the packages (``aoti_load_package``: a ``dlopen``, no codegen,
no C++ compiler) and runs them (llmcore_cpu.static_runner); nothing is compiled at warm start.

Graphs are pure functions. The KV cache is an input, never mutated inside a
graph: each graph returns the new tokens' keys and values and the runner
writes them into the slot cache afterwards (one indexing op). In-place writes
into a graph input are functionalized by torch.export into a copy of the whole
cache per layer unless Inductor manages to re-inplace them (a first version
took 2.0 s per SmolLM2 decode step, eager 0.11 s); a pure graph does not
depend on that.

Weights are not packed into the shared libraries
(``aot_inductor.package_constants_in_so=False``): the runner loads the model's
safetensors once (the model's fingerprint is part of the cache key and is
checked again at load) and hands the same tensors to every graph
(``load_constants(..., user_managed=True)``). So an entry is a few MB, however
many buckets it holds, and buckets share one copy of the weights.

KV layout: ``[num_layers, slots + 1, num_kv_heads, max_seq_len, head_dim]``;
the extra slot is scratch for padded decode rows.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.errors import ConfigError, PluginError
from llmcore.models.llama import LlamaForCausalLM, rotate_half
from llmcore.runtime.attention import TorchPagedAttention
from llmcore.runtime.runner import TorchModelRunner
from llmcore_cpu.cpuinfo import cpu_flags

log = logging.getLogger("llmcore.cpu.compiled")

COMPILER = "torch-aoti"
#: Bump when the graphs' inputs/outputs or the index file change.
GRAPH_FORMAT = 1
INDEX_FILE = "graphs.json"
INDUCTOR_CONFIGS: dict[str, Any] = {
    # weights come from the (fingerprinted) model folder at load, shared by every graph
    "aot_inductor.package_constants_in_so": False,
    # OpenMP thread count chosen at run time (default: baked in from the compiling machine)
    "cpp.dynamic_threads": True,
}
_MODEL_SOURCE = Path(sys.modules["llmcore.models.llama"].__file__)


# --------------------------------------------------------------------------- key


#: CPU features Inductor's generated code may use; the key's target lists those present.
_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpu_target() -> str:
    """Machine and the vector features present: code built for them needs them to run.

    Read from /proc/cpuinfo, not from Inductor's ISA probe, which builds test
    programs with the C++ compiler (seconds, and a compiler serving should not need).
    """
    flags = cpu_flags()
    present = [f for f in _ISA_FLAGS if f in flags]
    return f"{platform.machine()}:{'+'.join(present) or 'baseline'}"


def inductor_isa() -> str:
    """The vector ISA Inductor picked for code generation (recorded in the entry's metadata)."""
    try:
        # deferred: importing torch._inductor takes seconds, which serving a compiled entry never needs
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()).strip() or "scalar"
    except Exception as exc:
        return f"unknown ({exc})"


def graph_source_digest() -> str:
    """Hash of the code the graphs are traced from, so editing it invalidates old entries.

    The graph classes here plus the model file they call into; the runner is
    not included (a change to what graphs take or return bumps GRAPH_FORMAT).
    """
    h = hashlib.sha256()
    for obj in (_StaticGraph, DecodeGraph, PrefillGraph, kv_shape):
        h.update(inspect.getsource(obj).encode())
    h.update(_MODEL_SOURCE.read_bytes())
    return h.hexdigest()[:16]


def key_inputs() -> dict[str, Any]:
    return {
        "compiler": COMPILER,
        "compiler_version": torch.__version__,
        "compiler_flags": {**INDUCTOR_CONFIGS, "graph_format": GRAPH_FORMAT,
                           "graph_source": graph_source_digest()},
        "target": cpu_target(),
    }


# ------------------------------------------------------------------------ graphs


class _StaticGraph(nn.Module):
    """Shared pieces of the decode and prefill graphs (parameter names match on purpose)."""

    def __init__(self, model: nn.Module, max_seq_len: int) -> None:
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def _qkv(self, attn, h, cos, sin):
        t = h.shape[0]
        q, k, v = attn.qkv_proj(h).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = q.view(t, attn.num_heads, attn.head_dim)
        k = k.view(t, attn.num_kv_heads, attn.head_dim)
        v = v.view(t, attn.num_kv_heads, attn.head_dim)
        if attn.q_norm is not None:
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(self.model.model.norm(x)).float()


class DecodeGraph(_StaticGraph):
    """One token for each of B slots. Rows past the live batch point at the scratch slot."""

    def forward(self, input_ids, positions, slots, k_cache, v_cache):
        b = input_ids.shape[0]
        backbone = self.model.model
        x = backbone.embed_tokens(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        kpos = torch.arange(self.max_seq_len, device=input_ids.device)
        visible = (kpos[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, L]
        here = (kpos[None, :] == positions[:, None])[:, None, :, None]  # [B, 1, L, 1]
        new_k, new_v = [], []
        for i, layer in enumerate(backbone.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x), cos, sin)
            # the slot's context with this step's token put in place
            kk = torch.where(here, k[:, :, None, :], k_cache[i].index_select(0, slots))
            vv = torch.where(here, v[:, :, None, :], v_cache[i].index_select(0, slots))
            o = F.scaled_dot_product_attention(
                q[:, :, None, :], kk, vv, attn_mask=visible, scale=attn.scale, enable_gqa=True
            )
            x = x + attn.o_proj(o.reshape(b, attn.q_size))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_k.append(k)
            new_v.append(v)
        return self._logits(x), torch.stack(new_k), torch.stack(new_v)


class PrefillGraph(_StaticGraph):
    """Up to S tokens of one slot at positions start..; padding sits after the last real token."""

    def forward(self, input_ids, positions, slot, last, k_cache, v_cache):
        s = input_ids.shape[0]
        backbone = self.model.model
        x = backbone.embed_tokens(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        kpos = torch.arange(self.max_seq_len, device=input_ids.device)
        visible = (kpos[None, :] <= positions[:, None])[None, None]  # [1, 1, S, L]
        new_k, new_v = [], []
        for i, layer in enumerate(backbone.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x), cos, sin)
            kk = k_cache[i].index_select(0, slot).index_copy(2, positions, k.transpose(0, 1)[None])
            vv = v_cache[i].index_select(0, slot).index_copy(2, positions, v.transpose(0, 1)[None])
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], kk, vv, attn_mask=visible, scale=attn.scale, enable_gqa=True
            )
            x = x + attn.o_proj(o[0].transpose(0, 1).reshape(s, attn.q_size))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_k.append(k)
            new_v.append(v)
        return self._logits(x.index_select(0, last)), torch.stack(new_k), torch.stack(new_v)


def kv_shape(model_config, slots: int, max_seq_len: int) -> tuple[int, ...]:
    return (model_config.num_layers, slots + 1, model_config.num_kv_heads, max_seq_len, model_config.head_dim)


def _decode_inputs(b: int, plan, kv) -> tuple:
    pos = torch.arange(b, dtype=torch.long) % plan.max_seq_len
    slots = torch.arange(b, dtype=torch.long) % (plan.batch_size + 1)
    return (torch.zeros(b, dtype=torch.long), pos, slots, *kv)


def _prefill_inputs(s: int, plan, kv) -> tuple:
    pos = torch.arange(s, dtype=torch.long).clamp(max=plan.max_seq_len - 1)
    n = min(s, plan.max_seq_len - 1)
    return (torch.zeros(s, dtype=torch.long), pos, torch.zeros(1, dtype=torch.long),
            torch.tensor([n - 1]), *kv)


# ----------------------------------------------------------------------- compile


def _check_plan(plan) -> None:
    if plan.tensor_parallel != 1:
        raise ConfigError("tensor_parallel", plan.tensor_parallel, "the CPU compiled mode runs on one device",
                          "Use --tensor-parallel 1")
    if plan.quantization is not None:
        raise ConfigError("quantization", plan.quantization, "is not available in the CPU compiled mode")


def load_eager(model_config, model_path: Path, plan, eos_token_ids, seed: int, progress: bool):
    runner = TorchModelRunner(
        model_config, Path(model_path), torch.device("cpu"), plan.dtype, TorchPagedAttention(),
        block_size=16, max_model_len=plan.max_seq_len, eos_token_ids=list(eos_token_ids),
        seed=seed, progress=progress,
    )
    for p in runner.model.parameters():
        p.requires_grad_(False)
    return runner


def compile_graphs(
    model_path: Path, model_config, plan, out_dir: Path, *, progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export and AOT-compile every bucket of ``plan`` into ``out_dir``; return entry metadata.

    Each compiled graph is loaded back and checked (:func:`_verify`) before the entry is
    stored, so a miscompile never reaches the cache.
    """
    _check_plan(plan)
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True) if progress else None)
    eager = load_eager(model_config, model_path, plan, [], 0, progress)
    model = eager.model
    if not isinstance(model, LlamaForCausalLM):
        raise PluginError(f"the CPU compiled mode builds Llama-family graphs; {model_config.architecture} "
                          "is served by the eager engine only (drop compiled=)")
    kv = [torch.randn(kv_shape(model_config, plan.batch_size, plan.max_seq_len)).to(eager.dtype) * 0.5
          for _ in range(2)]
    # the float32 computation every graph is judged against (a copy only when the model is not float32)
    ref_model = model if eager.dtype == torch.float32 else copy.deepcopy(model).float()
    jobs = [("decode", b, DecodeGraph, _decode_inputs(b, plan, kv)) for b in plan.batch_buckets]
    jobs += [("prefill", s, PrefillGraph, _prefill_inputs(s, plan, kv)) for s in plan.seq_buckets]
    graphs, timings, diffs = [], {}, {}
    for n, (kind, size, graph_cls, inputs) in enumerate(jobs, 1):
        module = graph_cls(model, plan.max_seq_len)
        name = f"{kind}-{'b' if kind == 'decode' else 's'}{size}.pt2"
        label = f"[{n}/{len(jobs)}] {kind} graph, {'batch' if kind == 'decode' else 'tokens'} {size}"
        say(f"{label}: exporting and compiling ...")
        t0 = time.perf_counter()
        module.eval()
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own pytree deprecation notice, raised inside export; not ours to fix
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            ep = torch.export.export(module, inputs)
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(out_dir / name), inductor_configs=dict(INDUCTOR_CONFIGS)
            )
        seconds = time.perf_counter() - t0
        diff = _verify(out_dir / name, module, graph_cls(ref_model, plan.max_seq_len), inputs)
        say(f"{label}: done in {seconds:.1f}s ({_describe(diff, plan.dtype)})")
        graphs.append({"file": name, "kind": kind, "size": size})
        timings[name] = round(seconds, 2)
        diffs[name] = diff
    index = {
        "format": GRAPH_FORMAT,
        "kv_layout": "[num_layers, slots + 1, num_kv_heads, max_seq_len, head_dim]",
        "graphs": graphs,
        "constants": sorted(graph_constants(DecodeGraph(model, plan.max_seq_len))),
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return {"graphs": graphs, "compile_seconds": timings, "max_logit_diff_vs_float32": diffs,
            "torch": torch.__version__, "target": cpu_target(),
            "inductor_isa": inductor_isa()}


def graph_constants(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters())
    out.update(module.named_buffers())
    return out


def load_package(path: Path, constants: dict[str, torch.Tensor]):
    pkg = torch._inductor.aoti_load_package(str(path))
    names = pkg.get_constant_fqns()
    missing = [n for n in names if n not in constants]
    if missing:
        raise PluginError(f"compiled graph {path.name} expects weights the model does not have: "
                          f"{', '.join(missing[:5])}; recompile it")
    pkg.load_constants({n: constants[n] for n in names}, check_full_update=True, user_managed=True)
    return pkg


def _float32(inputs: tuple) -> tuple:
    return tuple(x.float() if x.is_floating_point() else x for x in inputs)


def _verify(path: Path, module: nn.Module, reference: nn.Module, inputs: tuple) -> dict[str, float]:
    """Check a compiled graph before it is cached; return its and eager torch's max |logit diff|.

    Both are measured against ``reference``: the same graph run eagerly in float32 (``module``
    itself for a float32 model). In bfloat16, eager torch rounds every op's output to bf16 while
    Inductor keeps a fused kernel's intermediates in float32, so the two can be far apart while
    both are near the float32 result: SmolLM2, one token at position 0, logits up to 31, eager
    bf16 7.7 from float32, the compiled graph 1.7, so 6.0 from each other. Comparing the
    compiled graph with eager bf16 refused a graph more accurate than eager torch (issue #17).

    The bound: the compiled graph may be as far from float32 as eager torch in the model's dtype
    is, plus a margin for rounding that fusion changes (1e-3 of the logits' scale in float32,
    where only the summation order differs; 5e-2 in bfloat16, whose 8-bit mantissa rounds each
    output to 0.4%). A miscompile (a wrong index, mask or weight) moves logits by their own scale.
    """
    pkg = load_package(path, graph_constants(module))
    low_precision = inputs[-1].dtype != torch.float32
    with torch.no_grad():
        eager = module(*inputs)[0]
        ref = reference(*_float32(inputs))[0] if low_precision else eager
    got = pkg(*inputs)[0]
    scale = max(float(ref.abs().max()), 1.0)
    diff = {"compiled": float((got - ref).abs().max()), "eager": float((eager - ref).abs().max())}
    bound = diff["eager"] + (5e-2 if low_precision else 1e-3) * scale
    if not diff["compiled"] <= bound:
        raise PluginError(f"compiled graph {path.name} is further from the float32 result than eager torch "
                          f"(max |logit diff| {diff['compiled']:.3g}, eager {diff['eager']:.3g}, bound {bound:.3g} "
                          f"on logits up to {scale:.3g}); not caching it")
    return diff


def _describe(diff: dict[str, float], dtype: str) -> str:
    if dtype == "float32":
        return f"max |logit diff| vs eager {diff['compiled']:.2e}"
    return f"max |logit diff| vs float32: compiled {diff['compiled']:.2e}, eager {dtype} {diff['eager']:.2e}"
