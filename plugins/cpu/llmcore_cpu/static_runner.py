"""Serves a CPU compiled entry (llmcore_cpu.compiled): fixed slots, AOTInductor graphs per bucket.

The graphs are pure functions of the slot KV cache (see llmcore_cpu.compiled); the runner
keeps the cache, gives each sequence a slot, pads decode batches and prefill chunks to the
compiled buckets, and writes each graph's new keys and values into the cache afterwards.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from llmcore.contract import SampleResult, ScheduledBatch, ScheduledSeq
from llmcore.errors import PluginError
from llmcore_cpu.compiled import (GRAPH_FORMAT, INDEX_FILE, DecodeGraph, graph_constants, kv_shape, load_eager,
                                  load_package)

log = logging.getLogger("llmcore.cpu.compiled")

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
        index = read_index(artifact_dir)
        self.eager = load_eager(model_config, model_path, plan, eos_token_ids, seed, progress)
        self.dtype = self.eager.dtype
        self.sampler = self.eager.sampler
        constants = graph_constants(DecodeGraph(self.eager.model, plan.max_seq_len))
        self.decode_graphs: dict[int, Any] = {}
        self.prefill_graphs: dict[int, Any] = {}
        for g in index["graphs"]:
            table = self.decode_graphs if g["kind"] == "decode" else self.prefill_graphs
            table[int(g["size"])] = load_package(artifact_dir / g["file"], constants)
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


def read_index(artifact_dir: Path) -> dict[str, Any]:
    path = Path(artifact_dir) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PluginError(f"{artifact_dir} is not a CPU compiled entry ({INDEX_FILE}: {exc}); recompile it") from None
    if index.get("format") != GRAPH_FORMAT:
        raise PluginError(f"{artifact_dir} holds graph format {index.get('format')!r}; this llmcore-cpu reads "
                          f"{GRAPH_FORMAT}; recompile it")
    return index

