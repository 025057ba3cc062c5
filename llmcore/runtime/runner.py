"""The model runner for torch devices: the only code that touches tensors.

One instance per engine. It builds the model on the meta device, streams the
safetensors weights into place (with a progress bar), owns the paged KV cache,
turns a :class:`~llmcore.contract.ScheduledBatch` into flat tensors and
attention metadata, runs the forward pass and samples.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from pathlib import Path

import torch

from llmcore import quantization
from llmcore.contract import AttentionBackend, AttentionMetadata, SampleResult, ScheduledBatch
from llmcore.errors import ModelLoadError
from llmcore.models import registry
from llmcore.models.config import ModelConfig
from llmcore.models.loader import count_tensors, iter_safetensors
from llmcore.outputs import Logprob
from llmcore.parallel.tensor_parallel import TPGroup
from llmcore.quantization.handler import checkpoint_format, trim_malloc
from llmcore.runtime.sampler import Sampler

log = logging.getLogger("llmcore.runner")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _CheckpointPages:
    """Takes the pages of the memory-mapped checkpoint already read back out of this process's RSS.

    ``iter_safetensors`` yields views of a memory-mapped file, and every page a copy reads stays
    mapped until the file is closed after its last tensor. For a float32 checkpoint that is twice
    a bf16 model, whatever is freed as the load goes (SmolLM2: 538 MB). ``MADV_DONTNEED`` on a
    file mapping none of whose pages was written (``Anonymous: 0 kB`` in ``smaps``) only unmaps:
    the page cache keeps the data and a tensor still viewing it reads it back on access, so no
    value changes; a mapping with a written page is left alone. Linux only; elsewhere (or if
    anything is unexpected) it does nothing.
    """

    MADV_DONTNEED = 4
    # reading smaps walks the process's page tables (~20 ms at 0.7 GB resident): release after
    # this many bytes read, not after every small layer
    EVERY_BYTES = 64 << 20

    def __init__(self, folder: Path) -> None:
        self.files = {os.path.realpath(p) for p in Path(folder).glob("*.safetensors")}
        self.unreleased = 0  # bytes of checkpoint tensors read since the last release
        self.madvise = None
        if sys.platform.startswith("linux") and self.files:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                self.madvise = libc.madvise
            except (OSError, AttributeError):
                pass

    def track(self, weights):
        """``weights`` unchanged, counting the bytes read."""
        for name, tensor in weights:
            self.unreleased += tensor.nbytes
            yield name, tensor

    def maybe_release(self) -> None:
        if self.unreleased >= self.EVERY_BYTES:
            self.release()

    def release(self) -> None:
        self.unreleased = 0
        if self.madvise is None:
            return
        try:
            with open("/proc/self/smaps") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        mapping, clean = None, False
        for line in lines + [""]:
            fields = line.split(maxsplit=5)
            if not fields or "-" in fields[0]:  # a mapping's header (or the end): act on the last one
                if mapping is not None and clean:
                    self.madvise(mapping[0], mapping[1] - mapping[0], self.MADV_DONTNEED)
                mapping, clean = None, False
                if len(fields) == 6 and fields[5] in self.files:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    mapping = (start, end)
            elif mapping is not None and fields[0] == "Anonymous:":
                clean = fields[1] == "0"


class TorchModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        folder: Path,
        device: torch.device,
        dtype: str,
        backend: AttentionBackend,
        block_size: int,
        max_model_len: int,
        eos_token_ids: list[int],
        seed: int = 0,
        progress: bool = True,
        quantization: str | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        self.config = model_config
        self.tp = tp  # one rank of a tensor-parallel group: build and load its shard only
        self.quantization = quantization
        self.device = device
        self.dtype = TORCH_DTYPES[dtype]
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.backend = backend
        self.model = self._load(folder, progress)
        self.sampler = Sampler(eos_token_ids, seed, device)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_kv_blocks = 0
        # a device may install a compiled decode step: called as
        # ``decode_graph(input_ids, positions, meta, kv_caches) -> float32 logits [B, vocab]``
        # for batches where every sequence decodes one token and samples it, and one for batches
        # with prompt rows: ``rows_graph(input_ids, positions, meta, kv_caches, logit_rows) ->
        # float32 logits [len(logit_rows), vocab]`` (the rows to sample, increasing). Neither runs
        # a batch that wants prompt logprobs (those need every row's hidden state).
        self.decode_graph = None
        self.rows_graph = None

    # ------------------------------------------------------------------ set-up

    def _load(self, folder: Path, progress: bool) -> torch.nn.Module:
        """Build the model on the meta device and load it part by part (see ``load_weights``).

        Each decoder layer is allocated when its first tensor arrives and, with a quantization
        that streams (every built-in one), swapped for its quantized form the moment its last
        tensor has, before the next is read. So the peak is the quantized model plus the float
        layers in flight, not the whole float model (issue #8); the result is bit for bit what
        quantizing the loaded float model gives (tests/quantization/test_streaming_load.py).
        """
        cls = registry.get_architecture(self.config.architecture)
        t0 = time.perf_counter()
        quant = self._quant_handler(folder)  # refuses a mismatched checkpoint before any tensor is read
        tp = self.tp
        if tp is not None:
            self.config = tp.local_config(self.config)
        with torch.device("meta"):
            model = cls(self.config)
        total = count_tensors(folder)
        pages = _CheckpointPages(folder)
        weights = pages.track(iter_safetensors(folder))
        if tp is not None:
            weights = tp.shard_weights(weights)
        if progress:
            from tqdm.auto import tqdm

            weights = tqdm(weights, total=total, desc="Loading weights", unit="tensor", leave=False)
        if quant is not None:
            weights = quant.convert_weights(weights)
        streaming = quant is not None and quant.streaming

        def loaded(name: str, module: torch.nn.Module) -> None:
            pages.maybe_release()  # the part is copied: its checkpoint pages out of RSS before quantizing
            if streaming:
                quant.quantize_loaded(model, name, module)
                trim_malloc()  # the float part just swapped out

        model.load_weights(weights, on_loaded=loaded, device=self.device, dtype=self.dtype)
        if streaming:
            quant.finish(model)
        elif quant is not None:
            quant.apply(model)  # a handler that only quantizes a whole loaded model
        if tp is not None:
            tp.finish(model)  # all-reduce after o_proj / down_proj
        model.init_rope(self.max_model_len, self.device, self.dtype)
        model.backend = self.backend
        model.eval()
        log.info(
            "loaded %s (%.1fM params, %s) in %.1f s",
            self.config.architecture, self.config.num_params() / 1e6, self.dtype, time.perf_counter() - t0,
        )
        return model

    def _quant_handler(self, folder: Path):
        """The quantization method's handler (llmcore.quantization), or None."""

        if self.quantization is None:
            fmt = checkpoint_format(folder)
            if fmt is not None:
                raise ModelLoadError(
                    f"{folder} holds a {fmt}-quantized checkpoint; load it with quantization={fmt!r} "
                    f"(--quantization {fmt}) on a device that offers it (see 'llmcore devices')"
                )
            return None

        dtype = next(k for k, v in TORCH_DTYPES.items() if v == self.dtype)
        handler = quantization.prepare(self.quantization, self.device.type, dtype)
        handler.check_checkpoint(folder)
        return handler

    def kv_bytes_per_block(self) -> int:
        return self.config.kv_bytes_per_token(self.dtype.itemsize) * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        cfg = self.config
        shape = (num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(cfg.num_layers)
        ]
        self.num_kv_blocks = num_blocks

    # ---------------------------------------------------------------- execute

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        if batch.finished_keys:
            self.sampler.release(batch.finished_keys)
        if batch.block_copies:
            self._copy_blocks(batch.block_copies)
        if not batch.seqs:
            return []
        input_ids, positions, meta, logit_rows = self._prepare(batch)
        if (self.decode_graph is not None and meta.decode_only
                and all(s.sample and not s.want_prompt_logprobs for s in batch.seqs)):
            logits = self.decode_graph(input_ids, positions, meta, self.kv_caches)
            return list(self.sampler(logits, batch.seqs))
        results: list[SampleResult | None] = [None] * len(batch.seqs)
        sample_idx = [i for i, s in enumerate(batch.seqs) if s.sample]
        if self.rows_graph is not None and not any(s.want_prompt_logprobs for s in batch.seqs):
            logits = self.rows_graph(input_ids, positions, meta, self.kv_caches, [logit_rows[i] for i in sample_idx])
            for i, res in zip(sample_idx, self.sampler(logits, [batch.seqs[i] for i in sample_idx])):
                results[i] = res
            return results
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if sample_idx:
            rows = torch.tensor([logit_rows[i] for i in sample_idx], device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows)).float()
            entries = [batch.seqs[i] for i in sample_idx]
            for i, res in zip(sample_idx, self.sampler(logits, entries)):
                results[i] = res
        for i, s in enumerate(batch.seqs):
            if s.want_prompt_logprobs:
                self._prompt_logprobs(hidden, meta, i, s, results)
        return results

    def _prepare(self, batch: ScheduledBatch):
        if all(len(s.token_ids) == 1 for s in batch.seqs):  # decode only (incl. 1-token chunks)
            return self._prepare_decode(batch)
        bs = self.block_size
        ids: list[int] = []
        pos_chunks: list[torch.Tensor] = []
        slot_chunks: list[torch.Tensor] = []
        starts, qlens, clens, tables, last_rows = [], [], [], [], []
        offset = 0
        for s in batch.seqs:
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            pos = torch.arange(s.start_pos, s.start_pos + n)
            table = torch.tensor(s.block_table, dtype=torch.long)
            pos_chunks.append(pos)
            slot_chunks.append(table[pos // bs] * bs + pos % bs)
            starts.append(offset)
            qlens.append(n)
            clens.append(s.start_pos + n)
            tables.append(list(s.block_table))
            offset += n
            last_rows.append(offset - 1)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long).to(dev)
        positions = torch.cat(pos_chunks).to(dev)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_chunks).to(dev),
            query_starts=starts,
            query_lens=qlens,
            context_lens=clens,
            block_tables=tables,
        )
        return input_ids, positions, meta, last_rows

    def _prepare_decode(self, batch: ScheduledBatch):
        """One token per sequence: plain lists and one tensor each (no per-sequence tensors)."""
        bs = self.block_size
        seqs = batch.seqs
        ids = [s.token_ids[0] for s in seqs]
        pos = [s.start_pos for s in seqs]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
        tables = [list(s.block_table) for s in seqs]
        clens = [p + 1 for p in pos]
        n = len(seqs)
        width = max(len(t) for t in tables)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev),
            query_starts=list(range(n)),
            query_lens=[1] * n,
            context_lens=clens,
            block_tables=tables,
            decode_only=True,
            block_table_tensor=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                            dtype=torch.long).to(dev),
            context_lens_tensor=torch.tensor(clens, dtype=torch.long).to(dev),
        )
        input_ids = torch.tensor(ids, dtype=torch.long).to(dev)
        positions = torch.tensor(pos, dtype=torch.long).to(dev)
        return input_ids, positions, meta, list(range(n))

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for k, v in self.kv_caches:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))

    def _prompt_logprobs(self, hidden, meta, i, s, results) -> None:
        """Logprob of each prompt token given the tokens before it (this chunk)."""
        k = s.params.prompt_logprobs or 0
        qs, ql = meta.query_starts[i], meta.query_lens[i]
        # position p predicts token p+1; the last prompt position predicts an output token
        n_pred = min(ql, s.num_prompt_tokens - 1 - s.start_pos)
        out: list[dict[int, Logprob]] = []
        if n_pred > 0:
            logits = self.model.compute_logits(hidden[qs : qs + n_pred]).float()
            lps = torch.log_softmax(logits, dim=-1)
            targets = s.history[s.start_pos + 1 : s.start_pos + 1 + n_pred]
            top = torch.topk(lps, k, dim=-1) if k > 0 else None
            for r, t in enumerate(targets):
                d = {t: Logprob(t, float(lps[r, t]))}
                if top is not None:
                    for v, j in zip(top.values[r].tolist(), top.indices[r].tolist()):
                        d.setdefault(j, Logprob(j, v))
                out.append(d)
        res = results[i]
        if res is None:
            res = results[i] = SampleResult(token_ids=[])
        res.prompt_logprobs = out

    # ------------------------------------------------------------- embeddings

    @torch.inference_mode()
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Mean-pooled last hidden state of ``token_ids`` (no KV cache kept)."""
        if not token_ids:
            raise ModelLoadError("cannot embed an empty input")
        cfg = self.config
        n = len(token_ids)
        nblocks = -(-n // self.block_size)
        shape = (nblocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        scratch = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(cfg.num_layers)
        ]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=self.device),
            query_starts=[0], query_lens=[n], context_lens=[n],
            block_tables=[list(range(nblocks))],
        )
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device), scratch, meta)
        return hidden.float().mean(dim=0)
