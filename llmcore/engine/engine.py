"""The engine: requests in, tokens out, continuous batching over a paged KV cache.

``Engine`` is synchronous and single-threaded; the server wraps it in a
background thread (``llmcore.engine.async_engine``). Each :meth:`step` asks the
scheduler for a batch, has the device's runner execute it, then appends the
sampled tokens, detokenizes and checks stop conditions.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Iterable, Iterator, Sequence as Seq

from llmcore.config import EngineConfig
from llmcore.engine.block_manager import BlockManager
from llmcore.engine.scheduler import Scheduler
from llmcore.engine.sequence import Request, Sequence
from llmcore.errors import ConfigError, PluginError, RequestError
from llmcore.outputs import CompletionOutput, RequestOutput, StreamDelta
from llmcore.sampling_params import SamplingParams
from llmcore.structured.support import StructuredOutputs

log = logging.getLogger("llmcore.engine")

DEFAULT_CPU_KV_BYTES = 2 << 30


class Engine:
    """Load a model on a device and generate.

    >>> engine = Engine()                      # embedded SmolLM2, best device
    >>> out = engine.generate("Hello", SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].outputs[0].text
    """

    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        *,
        plugins: Any = None,
        **kwargs: Any,
    ) -> None:
        from llmcore.models.config import ModelConfig
        from llmcore.models.loader import resolve_model
        from llmcore.models.tokenizer import Tokenizer
        from llmcore.plugins import get_registry
        from llmcore.selection import probe_all, select_device, validate_against

        self.config = cfg = EngineConfig(model=model, device=device, dtype=dtype, **kwargs)
        self.registry = plugins or get_registry()
        self.static = None
        if cfg.compiled is not None:
            # a compiled artifact's plan fixes device, dtype, model, slots and lengths;
            # explicit settings are checked against it (llmcore/engine/static.py)
            from llmcore.engine.static import explicit_settings, prepare_static

            self.static = prepare_static(cfg, explicit_settings(model, device, dtype, kwargs))
            model, device = cfg.model, cfg.device
        reports = probe_all(self.registry, {"device": device})
        chosen = select_device(self.registry, reports, device)
        self.probe = chosen.probe
        self.dtype = validate_against(cfg, self.probe, reports)
        caps = self.probe.capabilities

        self.model_path = resolve_model(model)
        self.model_config = mc = ModelConfig.from_path(self.model_path)
        self.max_model_len = self._resolve_max_len(cfg, mc, caps)
        self.tokenizer = Tokenizer(self.model_path, mc.eos_token_ids)

        dev = self.registry.hook.llmcore_create_device(name=self.probe.name, config=cfg)
        if dev is None:
            raise PluginError(f"no plugin created device {self.probe.name!r} (plugin {chosen.plugin!r})")
        self.device = dev
        cfg.block_size = dev.block_size  # the user's, else the device's default
        log.info("device %s (%s), dtype %s, model %s", dev.name, self.probe.description, self.dtype,
                 self.model_path)
        if self.static is not None:
            self.runner = self.static.create_runner(dev, chosen, mc, self.tokenizer.eos_token_ids)
        elif cfg.tensor_parallel_size > 1:
            # one process per rank; validates the size against model and device before loading
            from llmcore.parallel.executor import TensorParallelRunner

            self.runner = TensorParallelRunner(
                dev, mc, self.model_path, self.dtype, self.tokenizer.eos_token_ids, self.max_model_len
            )
        else:
            self.runner = dev.create_runner(
                mc, self.model_path, self.dtype, self.tokenizer.eos_token_ids, self.max_model_len
            )
        try:
            if cfg.num_threads and hasattr(self.runner, "set_num_threads"):
                self.runner.set_num_threads(cfg.num_threads)
            num_blocks = self._num_kv_blocks(cfg)
            self.runner.allocate_kv_cache(num_blocks)
        except BaseException:
            self.shutdown()  # tensor-parallel workers must not outlive a failed start
            raise
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.structured = StructuredOutputs(self.tokenizer, mc.vocab_size, self.probe, self.runner)
        budget = cfg.max_num_batched_tokens or max(2048, cfg.max_num_seqs)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, budget, cfg.enable_chunked_prefill,
                                   cfg.long_prefill_threshold)
        self._requests: dict[str, Request] = {}
        self._counter = itertools.count()
        self._peak_waste = 0.0
        self._peak_used_slots = 0
        self._steps = 0
        self._finished_requests = 0
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB), max_model_len %d",
                 num_blocks, cfg.block_size, num_blocks * self.runner.kv_bytes_per_block() / 2**20,
                 self.max_model_len)

    def shutdown(self) -> None:
        """Stop what the runner runs outside this process (tensor-parallel worker processes).

        Idempotent. Single-device runners have nothing to stop; a tensor-parallel engine cannot
        step afterwards.
        """
        stop = getattr(self.__dict__.get("runner"), "shutdown", None)
        if stop is not None:
            stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- set-up

    @staticmethod
    def _resolve_max_len(cfg: EngineConfig, mc, caps) -> int:
        limit = mc.max_position_embeddings
        if caps.max_seq_len:
            limit = min(limit, caps.max_seq_len)
        if cfg.max_model_len is None:
            return limit
        if cfg.max_model_len > mc.max_position_embeddings:
            raise ConfigError(
                "max_model_len", cfg.max_model_len,
                f"exceeds the model's max_position_embeddings ({mc.max_position_embeddings})",
                f"Use max_model_len <= {mc.max_position_embeddings}",
            )
        if caps.max_seq_len and cfg.max_model_len > caps.max_seq_len:
            raise ConfigError(
                "max_model_len", cfg.max_model_len, f"exceeds the device's limit ({caps.max_seq_len})",
                f"Use max_model_len <= {caps.max_seq_len}",
            )
        return cfg.max_model_len

    def _num_kv_blocks(self, cfg: EngineConfig) -> int:
        per_block = self.runner.kv_bytes_per_block()
        blocks_per_seq = -(-self.max_model_len // cfg.block_size)
        if cfg.num_kv_blocks is not None:
            n = cfg.num_kv_blocks
        else:
            budget = cfg.kv_cache_memory or self.device.kv_cache_bytes(self.runner) or DEFAULT_CPU_KV_BYTES
            n = max(budget // per_block, 1)
            # never more than every slot at full length could use
            n = min(n, blocks_per_seq * cfg.max_num_seqs)
        if n < blocks_per_seq:
            if cfg.max_model_len is not None:
                raise ConfigError(
                    "max_model_len", self.max_model_len,
                    f"needs {blocks_per_seq} KV blocks per sequence but only {n} fit in the KV cache",
                    f"Lower max_model_len to <= {n * cfg.block_size} or raise kv_cache_memory/num_kv_blocks",
                )
            # not set by the user: fit the default to the cache instead of failing
            self.max_model_len = n * cfg.block_size
            log.warning("max_model_len defaults to %d, the most the KV cache holds for one sequence "
                        "(set max_model_len or kv_cache_memory to change it)", self.max_model_len)
        return n

    # ---------------------------------------------------------------- requests

    def _tokenize(self, prompt: str | Seq[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise RequestError("prompt", prompt, "encodes to zero tokens", "Pass a non-empty prompt")
            return prompt, ids
        ids = list(prompt)
        if not ids:
            raise RequestError("prompt_token_ids", ids, "is empty", "Pass at least one token id")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError("prompt_token_ids", bad[:5], f"contains ids outside [0, {vocab})")
        return None, ids

    def add_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None,
    ) -> str:
        """Queue a request; it joins the running batch at the next step."""
        params = params or SamplingParams()
        text, ids = self._tokenize(prompt)
        if self.static is not None:
            self.static.check_request(len(ids), params, self.model_config.max_position_embeddings)
        if len(ids) >= self.max_model_len:
            raise RequestError(
                "prompt", f"<{len(ids)} tokens>",
                f"is {len(ids)} tokens; max_model_len={self.max_model_len} leaves no room to generate",
                f"Shorten the prompt to at most {self.max_model_len - 1} tokens or raise max_model_len",
            )
        need = self.block_manager.blocks_needed(len(ids) + 1) * params.n
        if need > self.block_manager.num_blocks:
            raise RequestError(
                "prompt", f"<{len(ids)} tokens>",
                f"needs {need} KV blocks but the cache has {self.block_manager.num_blocks}",
                "Raise kv_cache_memory / num_kv_blocks or shorten the prompt",
            )
        self.structured.check(params)  # refuses or compiles (cached) a constraint
        rid = request_id if request_id is not None else f"req-{next(self._counter)}"
        if rid in self._requests:
            raise RequestError("request_id", rid, "is already in use")
        req = Request(rid, text, ids, params)
        seq = req.seqs[0]
        seq.prefix_offset = max(len(ids) - 5, 0)
        seq.read_offset = len(ids)
        self._requests[rid] = req
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. Returns False if unknown."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        req.aborted = True
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # -------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of the requests it advanced."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if batch.finished_keys or batch.block_copies:
                self.runner.execute(batch)
            if self.scheduler.waiting and not self.scheduler.running:
                seq = self.scheduler.waiting[0]
                raise RuntimeError(f"cannot schedule seq {seq.seq_id}: KV cache too small")
            return []
        results = self.runner.execute(batch)
        touched: dict[str, Request] = {}
        seqs = {s.seq_id: s for s in self.scheduler.running}
        now = time.monotonic()
        for entry in batch.seqs:
            seq = seqs[entry.seq_id]
            seq.num_computed_tokens += entry.num_new
            self.block_manager.commit_full_blocks(seq, seq.num_computed_tokens)
        self._track_waste()
        for entry, res in zip(batch.seqs, results):
            seq = seqs[entry.seq_id]
            req = seq.request
            touched[req.request_id] = req
            if res is not None and res.prompt_logprobs is not None and req.prompt_logprobs is not None:
                req.prompt_logprobs.extend(res.prompt_logprobs)
            if not entry.sample or res is None:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            targets = [seq]
            if entry.num_samples > 1:
                targets += self._fork(seq, entry.num_samples - 1)
            for i, s in enumerate(targets):
                lp = res.logprobs[i] if res.logprobs else None
                chosen = res.chosen_logprobs[i] if res.chosen_logprobs else None
                self._append(s, res.token_ids[i], lp, chosen)
        outputs = []
        for req in touched.values():
            out = self._output(req)
            if out.finished:
                req.finish_time = now
                self._requests.pop(req.request_id, None)
                self._finished_requests += 1
                self._emit_finished(req, out)
            outputs.append(out)
        self._steps += 1
        self._emit_step(batch, time.perf_counter() - t0)
        return outputs

    def _fork(self, parent: Sequence, count: int) -> list[Sequence]:
        req = parent.request
        req.forked = True
        children = []
        after = parent
        for i in range(1, count + 1):
            child = Sequence(req, i, list(parent.token_ids))
            child.num_prompt_tokens = parent.num_prompt_tokens
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.prefix_offset, child.read_offset = parent.prefix_offset, parent.read_offset
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child, after=after)
            req.seqs.append(child)
            children.append(child)
            after = child
        return children

    def _append(self, seq: Sequence, token: int, lp, chosen: float | None) -> None:
        p = seq.params
        seq.token_ids.append(token)
        if chosen is not None:
            seq.cumulative_logprob += chosen
        if lp is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(lp)
        new_text, seq.prefix_offset, seq.read_offset = self.tokenizer.detokenize_incrementally(
            seq.token_ids, seq.prefix_offset, seq.read_offset, p.skip_special_tokens
        )
        seq.text += new_text
        n_out = seq.num_output_tokens
        reason: str | None = None
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                reason, seq.stop_reason = "stop", token
            elif not p.ignore_eos and token in self.tokenizer.eos_token_ids:
                reason = "stop"
            elif p.stop_strings and new_text:
                reason = self._check_stop_strings(seq, len(new_text))
        if reason is None and (n_out >= p.max_tokens or len(seq.token_ids) >= self.max_model_len):
            reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_len: int) -> str | None:
        p = seq.params
        longest = max(len(s) for s in p.stop_strings)
        window_start = max(len(seq.text) - new_len - longest + 1, 0)
        best = None
        for s in p.stop_strings:
            i = seq.text.find(s, window_start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        seq.text = seq.text[: i + len(s)] if p.include_stop_str_in_output else seq.text[:i]
        seq.stop_reason = s
        return "stop"

    # ------------------------------------------------------------------ output

    def _output(self, req: Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index, text=s.text, token_ids=s.output_token_ids,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                logprobs=s.logprobs, cumulative_logprob=s.cumulative_logprob,
            )
            for s in sorted(req.seqs, key=lambda s: s.index)
        ]
        first = req.seqs[0]
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            outputs=outs, finished=req.finished, num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=req.prompt_logprobs,
            metrics={
                "arrival_time": req.arrival_time,
                "first_token_time": req.first_token_time or 0.0,
            },
        )

    def _emit_finished(self, req: Request, out: RequestOutput) -> None:
        try:
            self.registry.hook.llmcore_request_finished(output=out, stats={
                "arrival_time": req.arrival_time,
                "first_token_time": req.first_token_time,
                "finish_time": req.finish_time,
                "num_prompt_tokens": len(req.prompt_token_ids),
                "num_generated_tokens": sum(len(o.token_ids) for o in out.outputs),
                "num_cached_tokens": out.num_cached_tokens,
            })
        except Exception:  # observers must never break serving
            log.exception("llmcore_request_finished observer failed")

    def _emit_step(self, batch, seconds: float) -> None:
        try:
            self.registry.hook.llmcore_step_stats(stats={
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                "num_prefill_tokens": sum(s.num_new for s in batch.seqs if s.num_new > 1),
                "num_decode_tokens": sum(1 for s in batch.seqs if s.num_new == 1),
                "kv_blocks_used": self.block_manager.num_blocks - self.block_manager.num_free_blocks,
                "kv_blocks_total": self.block_manager.num_blocks,
                "step_seconds": seconds,
            })
        except Exception:
            log.exception("llmcore_step_stats observer failed")

    def _track_waste(self) -> None:
        """KV waste at peak: allocated slots not holding a token, at the step with the most.

        O(1) per step; the exact count (a walk over the blocks) runs only when the
        number of blocks in use reaches a new peak.
        """
        bm = self.block_manager
        allocated = (bm.num_blocks - bm.num_free_blocks) * bm.block_size
        if allocated <= self._peak_used_slots:
            return
        bs = bm.block_size
        held = 0
        seen: set[int] = set()
        for s in self.scheduler.running:
            for i, b in enumerate(s.block_table):
                if b not in seen:
                    seen.add(b)
                    held += min(bs, max(s.num_computed_tokens - i * bs, 0))
        self._peak_used_slots = allocated
        self._peak_waste = (allocated - held) / allocated if allocated else 0.0

    def stats(self) -> dict[str, Any]:
        """Live counters: queues, KV use, prefix-cache hit rate, preemptions, waste at peak."""
        bst = self.block_manager.stats()
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": bst.used,
            "kv_blocks_free": bst.free,
            "kv_blocks_total": bst.num_blocks,
            "prefix_cache_hit_rate": bst.hit_rate,
            "prefix_cache_hit_tokens": bst.prefix_hits,
            "prefix_cache_queried_tokens": bst.prefix_queried_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_waste_at_peak": self._peak_waste,
            "steps": self._steps,
            "finished_requests": self._finished_requests,
        }

    # ---------------------------------------------------------- convenience API

    def generate(
        self,
        prompts: str | Seq[int] | Iterable[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for one or many prompts (text or token ids); outputs keep input order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompt_list = [prompts]
        else:
            prompt_list = list(prompts)
        if not prompt_list:
            raise ConfigError("prompts", [], "is empty", "Pass at least one prompt")
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompt_list):
                raise ConfigError(
                    "params", f"<{len(params)} SamplingParams>",
                    f"must match the number of prompts ({len(prompt_list)})",
                    "Pass one SamplingParams for all prompts, or one per prompt",
                )
            plist = list(params)
        else:
            plist = [params or SamplingParams()] * len(prompt_list)
        ids = []
        try:
            for p, sp in zip(prompt_list, plist):
                ids.append(self.add_request(p, sp))
        except Exception:
            for rid in ids:
                self.abort(rid)
            raise
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req")
        try:
            while len(final) < len(ids):
                for out in self.step():
                    if out.finished and out.request_id in ids:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in final:
                    self.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[r] for r in ids]

    def stream(self, prompt: str | Seq[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield text and tokens as they are generated.

        Stopping the iteration early (``break``, ``close()``) aborts the request
        and frees its KV blocks at once.
        """
        rid = self.add_request(prompt, params)
        req = self._requests[rid]
        sent_tokens: dict[int, int] = {}
        sent_text: dict[int, int] = {}
        done: set[int] = set()
        try:
            while True:
                outs = self.step()
                for out in outs:
                    if out.request_id != rid:
                        continue
                    for o in out.outputs:
                        if o.index in done:
                            continue
                        hold = 0 if o.finished else self._holdback(req.params)
                        text_end = max(len(o.text) - hold, sent_text.get(o.index, 0))
                        text = o.text[sent_text.get(o.index, 0) : text_end]
                        toks = o.token_ids[sent_tokens.get(o.index, 0) :]
                        lps = o.logprobs[sent_tokens.get(o.index, 0) :] if o.logprobs else None
                        sent_text[o.index] = text_end
                        sent_tokens[o.index] = len(o.token_ids)
                        if o.finished:
                            done.add(o.index)
                        if text or toks or o.finished:
                            yield StreamDelta(rid, o.index, text, toks, o.finish_reason, lps)
                    if out.finished:
                        return
                if not outs and not self.scheduler.has_work():
                    return
        finally:
            if rid in self._requests:
                self.abort(rid)

    @staticmethod
    def _holdback(params: SamplingParams) -> int:
        """Characters held back while streaming so a stop string is never leaked."""
        if not params.stop_strings or params.include_stop_str_in_output:
            return 0
        return max(len(s) for s in params.stop_strings) - 1

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not convs:
            raise ConfigError("messages", messages, "is empty", "Pass a list of {role, content} dicts")
        prompts = [self.tokenizer.apply_chat_template(c) for c in convs]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    def embed(self, text: str | Seq[int]) -> list[float]:
        _, ids = self._tokenize(text)
        if len(ids) > self.max_model_len:
            raise RequestError("input", f"<{len(ids)} tokens>", f"exceeds max_model_len={self.max_model_len}")
        return self.runner.embed(ids).tolist()

