"""The decode step compiled with torch.compile (Inductor) for the dynamic CPU engine.

Opt-in (``Engine(compile_decode=True)``, ``--compile-decode``). Eager decode dispatches ~20
small ops per layer; Inductor fuses the norms, RoPE, residual adds and SiLU into a few C++
loops and prepacks every weight for oneDNN once (``freezing``), so a step is one call.
Measured on SmolLM2 bf16, 2 cores: single-stream decode 1.2x the eager engine; at 64
sequences the step is bound by the matrix products and gains ~4% (docs/benchmarks.md).

What is compiled is the model's own ``forward`` and ``compute_logits`` with the torch
attention backend's batched-decode path (KV write + grouped matmuls over the padded block
table): no second copy of the model code. Prefill, mixed batches and anything needing more
than sampled logits stay eager.

One graph serves every batch size and context length: batch and block-table width are
dynamic, and both are padded to at least 2 (a duplicate of row 0, which writes the same K/V
into the same slot; an extra block-table column that the context-length mask hides) so that
torch's specialisation of size-1 dimensions never triggers a second compile.

Cost: the first use compiles for minutes on a small machine (SmolLM2-135M: 70-200 s on
2 cores); Inductor's on-disk caches (keyed by the model's shapes and the block size) make
later processes with the same settings start in seconds. Frozen,
prepacked weights are a second copy of the linear weights next to the eager ones that
prefill uses.
"""

from __future__ import annotations

import logging
import time

import torch

from llmcore.runtime.attention import AttentionMetadata

log = logging.getLogger("llmcore.cpu")


class CompiledDecode:
    """``decode_graph`` for :class:`~llmcore.runtime.runner.TorchModelRunner`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls = 0
        self.recompiles = 0  # graphs compiled after the first (expected: none)

        def step(input_ids, positions, block_tables, context_lens, slot_mapping, kv_caches):
            meta = AttentionMetadata(
                slot_mapping=slot_mapping, query_starts=[], query_lens=[], context_lens=[],
                block_tables=[], decode_only=True, block_table_tensor=block_tables,
                context_lens_tensor=context_lens,
            )
            hidden = model(input_ids, positions, kv_caches, meta)
            return model.compute_logits(hidden).float()

        self._fn = torch.compile(step, dynamic=True, fullgraph=True)

    def __call__(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        n = input_ids.shape[0]
        tables, lens, slots = meta.block_table_tensor, meta.context_lens_tensor, meta.slot_mapping
        if tables.shape[1] < 2:
            tables = torch.cat([tables, torch.zeros_like(tables)], dim=1)
        if n < 2:
            input_ids, positions, slots = input_ids.repeat(2), positions.repeat(2), slots.repeat(2)
            tables, lens = tables.repeat(2, 1), lens.repeat(2)
        args = (input_ids, positions, tables, lens, slots, kv_caches)
        if self.calls == 0:
            t0 = time.perf_counter()
            logits = self._compile_call(*args)
            log.info("compiled the decode step in %.1f s (Inductor; cached on disk for later starts)",
                     time.perf_counter() - t0)
        else:
            # one graph, inputs of fixed dtypes and ranks: skip re-checking every guard on the
            # model's ~300 parameters each step (~1 ms of a ~19 ms single-stream step)
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    logits = self._fn(*args)
            except RuntimeError as exc:  # an input the graph does not cover: compile another
                if "Recompilation triggered" not in str(exc):
                    raise
                log.warning("decode step needs another graph (%s); compiling it", exc)
                self.recompiles += 1
                logits = self._compile_call(*args)
        self.calls += 1
        return logits[:n]

    def _compile_call(self, *args):
        """A call that may compile: weights frozen (constants that Inductor prepacks for oneDNN)
        and no duck sizing (batch and block-table width are both 2 at first: the graph must not
        assume they stay equal)."""
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as fx_config

        with inductor_config.patch(freezing=True), fx_config.patch(use_duck_shape=False):
            return self._fn(*args)


def install(runner) -> CompiledDecode:
    runner.decode_graph = CompiledDecode(runner.model)
    return runner.decode_graph
