"""CPU compiled mode: torch.export + AOTInductor graphs for a StaticPlan's fixed shapes.

One graph per compiled shape, each an AOTInductor package (``.pt2``: a shared
library plus its metadata) built by ``torch._inductor.aoti_compile_and_package``:

* ``decode-b{B}.pt2`` for every batch bucket ``B``: one new token for each of
  ``B`` slots;
* ``prefill-s{S}.pt2`` for every sequence bucket ``S``: up to ``S`` prompt
  tokens of one slot (a chunk may start after earlier chunks).

Serving loads the packages (``aoti_load_package``: a ``dlopen``, no codegen,
no C++ compiler) and runs them; nothing is compiled at warm start.

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

import hashlib
import inspect
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.engine.batch import SampleResult, ScheduledBatch, ScheduledSeq
from llmcore.errors import ConfigError, PluginError
from llmcore.models.llama import LlamaForCausalLM, rotate_half

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
    from llmcore_cpu.plugin import _cpu_flags

    flags = _cpu_flags()
    present = [f for f in _ISA_FLAGS if f in flags]
    return f"{platform.machine()}:{'+'.join(present) or 'baseline'}"


def inductor_isa() -> str:
    """The vector ISA Inductor picked for code generation (recorded in the entry's metadata)."""
    try:
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


def _load_eager(model_config, model_path: Path, plan, eos_token_ids, seed: int, progress: bool):
    from llmcore.runtime.attention import TorchPagedAttention
    from llmcore.runtime.runner import TorchModelRunner

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

    Each compiled graph is loaded back and checked against the eager graph it
    came from before the entry is stored, so a miscompile never reaches the cache.
    """
    _check_plan(plan)
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True) if progress else None)
    eager = _load_eager(model_config, model_path, plan, [], 0, progress)
    model = eager.model
    if not isinstance(model, LlamaForCausalLM):
        raise PluginError(f"the CPU compiled mode builds Llama-family graphs; {model_config.architecture} "
                          "is served by the eager engine only (drop compiled=)")
    kv = [torch.randn(kv_shape(model_config, plan.batch_size, plan.max_seq_len)).to(eager.dtype) * 0.5
          for _ in range(2)]
    jobs = [("decode", b, DecodeGraph(model, plan.max_seq_len), _decode_inputs(b, plan, kv))
            for b in plan.batch_buckets]
    jobs += [("prefill", s, PrefillGraph(model, plan.max_seq_len), _prefill_inputs(s, plan, kv))
             for s in plan.seq_buckets]
    graphs, timings, diffs = [], {}, {}
    for n, (kind, size, module, inputs) in enumerate(jobs, 1):
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
        err = _verify(out_dir / name, module, inputs)
        say(f"{label}: done in {seconds:.1f}s (max |logit diff| vs eager {err:.2e})")
        graphs.append({"file": name, "kind": kind, "size": size})
        timings[name] = round(seconds, 2)
        diffs[name] = err
    index = {
        "format": GRAPH_FORMAT,
        "kv_layout": "[num_layers, slots + 1, num_kv_heads, max_seq_len, head_dim]",
        "graphs": graphs,
        "constants": sorted(_constants(jobs[0][2])),
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return {"graphs": graphs, "compile_seconds": timings, "max_logit_diff_vs_eager": diffs,
            "torch": torch.__version__, "target": cpu_target(),
            "inductor_isa": inductor_isa()}


def _constants(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters())
    out.update(module.named_buffers())
    return out


def _load_package(path: Path, constants: dict[str, torch.Tensor]):
    pkg = torch._inductor.aoti_load_package(str(path))
    names = pkg.get_constant_fqns()
    missing = [n for n in names if n not in constants]
    if missing:
        raise PluginError(f"compiled graph {path.name} expects weights the model does not have: "
                          f"{', '.join(missing[:5])}; recompile it")
    pkg.load_constants({n: constants[n] for n in names}, check_full_update=True, user_managed=True)
    return pkg


def _verify(path: Path, module: nn.Module, inputs: tuple) -> float:
    pkg = _load_package(path, _constants(module))
    with torch.no_grad():
        want = module(*inputs)[0]
    got = pkg(*inputs)[0]
    err = float((want - got).abs().max())
    scale = float(want.abs().max()) or 1.0
    tol = 1e-3 if want.dtype == torch.float32 and inputs[-1].dtype == torch.float32 else 5e-2
    if not err <= tol * max(scale, 1.0):
        raise PluginError(f"compiled graph {path.name} disagrees with eager torch (max |diff| {err:.3g} "
                          f"on logits up to {scale:.3g}); not caching it")
    return err


# ------------------------------------------------------------------------ runner


class CpuStaticRunner:
    """Serves a compiled entry: fixed slots, decode padded to a batch bucket, prefill to a seq bucket.

    Sequences are keyed by ``ScheduledSeq.key``; a key gets the lowest free
    slot on first sight and gives it back when it appears in
    ``ScheduledBatch.finished_keys``.
    """

    def __init__(self, artifact_dir: Path, plan, model_config, model_path: Path, eos_token_ids: list[int],
                 *, block_size: int = 16, seed: int = 0, progress: bool = True) -> None:
        t0 = time.perf_counter()
        self.plan = plan
        self.config = model_config
        self.block_size = block_size
        self.num_kv_blocks = 0
        index = _read_index(artifact_dir)
        self.eager = _load_eager(model_config, model_path, plan, eos_token_ids, seed, progress)
        self.dtype = self.eager.dtype
        self.sampler = self.eager.sampler
        constants = _constants(DecodeGraph(self.eager.model, plan.max_seq_len))
        self.decode_graphs: dict[int, Any] = {}
        self.prefill_graphs: dict[int, Any] = {}
        for g in index["graphs"]:
            table = self.decode_graphs if g["kind"] == "decode" else self.prefill_graphs
            table[int(g["size"])] = _load_package(artifact_dir / g["file"], constants)
        want_b, want_s = set(plan.batch_buckets), set(plan.seq_buckets)
        if set(self.decode_graphs) != want_b or set(self.prefill_graphs) != want_s:
            raise PluginError(f"compiled entry {artifact_dir} holds graphs for batch {sorted(self.decode_graphs)} "
                              f"/ tokens {sorted(self.prefill_graphs)}, but its plan says {sorted(want_b)} / "
                              f"{sorted(want_s)}; recompile it")
        self.scratch_slot = plan.batch_size
        self.slot_of: dict[str, int] = {}
        self.free_slots = list(range(plan.batch_size))
        self.k_cache = self.v_cache = None
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %d compiled graphs from %s in %.2fs", len(index["graphs"]), artifact_dir,
                 self.load_seconds)

    # ------------------------------------------------------------------ set-up

    def kv_bytes_per_block(self) -> int:
        return self.config.kv_bytes_per_token(self.dtype.itemsize) * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The slot cache is fixed by the plan; ``num_blocks`` only sizes the engine's bookkeeping."""
        shape = kv_shape(self.config, self.plan.batch_size, self.plan.max_seq_len)
        self.k_cache = torch.zeros(shape, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, dtype=self.dtype)
        self.num_kv_blocks = num_blocks

    def set_num_threads(self, n: int) -> None:
        torch.set_num_threads(n)

    def embed(self, token_ids):
        raise PluginError("embeddings are not served from a compiled artifact; create the Engine "
                          "without compiled= to embed")

    # ----------------------------------------------------------------- execute

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        if batch.finished_keys:
            for key in batch.finished_keys:
                slot = self.slot_of.pop(key, None)
                if slot is not None:
                    self.free_slots.append(slot)
            self.free_slots.sort()
            self.sampler.release(batch.finished_keys)
        # block_copies (copy-on-write of shared paged blocks) have no meaning here: slots are private
        if not batch.seqs:
            return []
        slots = [self._slot(s) for s in batch.seqs]
        rows: dict[int, torch.Tensor] = {}
        decodes = [i for i, s in enumerate(batch.seqs) if s.num_new == 1]
        for i, s in enumerate(batch.seqs):
            if s.num_new > 1:
                rows[i] = self._prefill(s, slots[i])
        top = self.plan.batch_size
        for g in range(0, len(decodes), top):
            group = decodes[g : g + top]
            logits = self._decode([batch.seqs[i] for i in group], [slots[i] for i in group])
            for r, i in enumerate(group):
                rows[i] = logits[r]
        results: list[SampleResult | None] = [None] * len(batch.seqs)
        sample = [i for i, s in enumerate(batch.seqs) if s.sample]
        if sample:
            logits = torch.stack([rows[i] for i in sample])
            for i, res in zip(sample, self.sampler(logits, [batch.seqs[i] for i in sample])):
                results[i] = res
        return results

    def _slot(self, s: ScheduledSeq) -> int:
        slot = self.slot_of.get(s.key)
        if slot is not None:
            return slot
        if not self.free_slots:
            raise RuntimeError(f"all {self.plan.batch_size} compiled slots are in use; the scheduler "
                               f"must run at most {self.plan.batch_size} sequences")
        slot = self.free_slots.pop(0)
        self.slot_of[s.key] = slot
        if s.start_pos > 0:
            # a sample forked from a prompt (n > 1) starts where its parent's prompt ends
            parent = self.slot_of.get(s.key.rsplit(":", 1)[0] + ":0")
            if parent is None:
                raise RuntimeError(f"sequence {s.key} starts at position {s.start_pos} but no slot holds "
                                   "its context")
            self.k_cache[:, slot, :, : s.start_pos] = self.k_cache[:, parent, :, : s.start_pos]
            self.v_cache[:, slot, :, : s.start_pos] = self.v_cache[:, parent, :, : s.start_pos]
        return slot

    def _prefill(self, s: ScheduledSeq, slot: int) -> torch.Tensor:
        top = self.plan.seq_buckets[-1]
        limit = self.plan.max_seq_len
        logits = None
        for off in range(0, s.num_new, top):
            chunk = s.token_ids[off : off + top]
            n, start = len(chunk), s.start_pos + off
            if start + n > limit:
                raise RuntimeError(f"sequence {s.key} reaches position {start + n - 1}, past the compiled "
                                   f"max_seq_len {limit}")
            size = self.plan.bucket_for_len(n)
            ids = torch.zeros(size, dtype=torch.long)
            ids[:n] = torch.tensor(chunk, dtype=torch.long)
            pos = torch.arange(start, start + size, dtype=torch.long).clamp_(max=limit - 1)
            logits, nk, nv = self.prefill_graphs[size](
                ids, pos, torch.tensor([slot]), torch.tensor([n - 1]), self.k_cache, self.v_cache
            )
            self.k_cache[:, slot, :, start : start + n] = nk[:, :n].transpose(1, 2)
            self.v_cache[:, slot, :, start : start + n] = nv[:, :n].transpose(1, 2)
        return logits[0]

    def _decode(self, seqs: list[ScheduledSeq], slots: list[int]) -> torch.Tensor:
        b = len(seqs)
        size = self.plan.bucket_for_batch(b)
        pad = size - b
        ids = torch.tensor([s.token_ids[0] for s in seqs] + [0] * pad, dtype=torch.long)
        pos = torch.tensor([s.start_pos for s in seqs] + [0] * pad, dtype=torch.long)
        slot_t = torch.tensor(slots + [self.scratch_slot] * pad, dtype=torch.long)
        logits, nk, nv = self.decode_graphs[size](ids, pos, slot_t, self.k_cache, self.v_cache)
        # advanced indices around a slice put the batch dim first: [b, layers, kv_heads, head_dim]
        self.k_cache[:, slot_t[:b], :, pos[:b]] = nk[:, :b].transpose(0, 1)
        self.v_cache[:, slot_t[:b], :, pos[:b]] = nv[:, :b].transpose(0, 1)
        return logits[:b]


def _read_index(artifact_dir: Path) -> dict[str, Any]:
    path = Path(artifact_dir) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PluginError(f"{artifact_dir} is not a CPU compiled entry ({INDEX_FILE}: {exc}); recompile it") from None
    if index.get("format") != GRAPH_FORMAT:
        raise PluginError(f"{artifact_dir} holds graph format {index.get('format')!r}; this llmcore-cpu reads "
                          f"{GRAPH_FORMAT}; recompile it")
    return index


def default_threads(config) -> int:
    return config.num_threads or os.cpu_count() or 1
