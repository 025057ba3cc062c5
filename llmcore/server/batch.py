"""``llmcore batch INPUT.jsonl OUTPUT.jsonl``: offline jobs in the OpenAI batch-file format.

Each input line is one request::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}

``url`` is ``/v1/chat/completions``, ``/v1/completions`` or ``/v1/embeddings``;
``body`` is what the server takes (``model`` is required but every line runs
on the one engine). Each output line is::

    {"id": "batch_req_…", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "…", "body": {…the API response…}},
     "error": null}

A request the API would refuse gets ``status_code`` 400 and the error body; a
line that cannot be read (bad JSON, no ``custom_id``, wrong ``url``…) gets
``"response": null`` and ``"error": {"code", "message", "line"}``, is reported
with its line number on stderr, and the job goes on.

All requests go through one engine with continuous batching, at most
``max_in_flight`` at once; results are appended (one flushed line each) in
the order they finish. Rerunning the same command resumes: custom_ids already
in OUTPUT are skipped, and a half-written last line from a killed run is
dropped first.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError
from tqdm.auto import tqdm

from llmcore.errors import ConfigError
from llmcore.server.convert import (
    DEFAULT_CHAT_MAX_TOKENS,
    PromptInfo,
    chat_messages,
    completion_prompts,
    make_prepare,
    sampling_params,
)
from llmcore.server.embeddings import INPUT_ALIASES, check_embedding_request, embed_all, embeddings_response
from llmcore.server.errors import ApiError, config_error_to_api, validation_error_to_api
from llmcore.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from llmcore.server.responses import ResponseBuilder, TokenDecoder, new_id
from llmcore.server.structured import chat_tools

log = logging.getLogger("llmcore.batch")

URLS = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}


@dataclass
class BatchSummary:
    total_lines: int = 0
    skipped: int = 0  # already in OUTPUT
    succeeded: int = 0
    failed: int = 0  # requests answered with an error status
    bad_lines: list[int] = field(default_factory=list)  # unreadable lines
    generated_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.bad_lines and not self.interrupted

    def describe(self) -> str:
        rate = self.generated_tokens / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.succeeded} succeeded"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.bad_lines:
            shown = ", ".join(map(str, self.bad_lines[:10])) + (" …" if len(self.bad_lines) > 10 else "")
            parts.append(f"{len(self.bad_lines)} bad line(s) ({shown})")
        if self.skipped:
            parts.append(f"{self.skipped} skipped (already in OUTPUT)")
        return (f"{', '.join(parts)}; {self.generated_tokens} tokens generated in {self.seconds:.1f} s "
                f"({rate:.1f} tok/s)")


@dataclass
class _Job:
    line: int
    custom_id: str
    url: str
    request: Any
    rids: list[str] = field(default_factory=list)
    builder: ResponseBuilder | None = None
    finals: list[Any] = field(default_factory=list)
    remaining: int = 0
    request_id: str = ""


def read_done(output: Path) -> tuple[set[str], set[int]]:
    """custom_ids (and, for unreadable lines, line numbers) already answered in OUTPUT.

    A last line without its newline (the run was killed mid-write) is cut off.
    """
    done_ids: set[str] = set()
    done_lines: set[int] = set()
    if not output.exists():
        return done_ids, done_lines
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping a half-written last line from an interrupted run", output)
        with open(output, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            log.warning("%s line %d: not JSON, ignored", output, n)
            continue
        if not isinstance(rec, dict):
            continue
        cid = rec.get("custom_id")
        if isinstance(cid, str):
            done_ids.add(cid)
        else:
            err = rec.get("error") or {}
            if isinstance(err, dict) and isinstance(err.get("line"), int):
                done_lines.add(err["line"])
    return done_ids, done_lines


class BatchRunner:
    """Runs a batch file through one :class:`~llmcore.engine.engine.Engine`."""

    def __init__(self, engine: Any, model_name: str, *, max_in_flight: int | None = None,
                 progress: bool = True, stderr: TextIO | None = None,
                 default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> None:
        self.engine = engine
        self.default_max_tokens = default_max_tokens
        self.model_name = model_name
        self.max_in_flight = max_in_flight or max(4 * engine.config.max_num_seqs, 8)
        self.progress = progress
        self.stderr = stderr or sys.stderr
        self.decode = TokenDecoder(engine.tokenizer)

    # ------------------------------------------------------------ output lines

    def _write(self, out: TextIO, rec: dict[str, Any]) -> None:
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()

    def _bad_line(self, out: TextIO, summary: BatchSummary, line: int, code: str, message: str,
                  custom_id: str | None = None) -> None:
        print(f"batch: line {line}: {message}", file=self.stderr, flush=True)
        summary.bad_lines.append(line)
        self._write(out, {"id": new_id("batch_req"), "custom_id": custom_id, "response": None,
                          "error": {"code": code, "message": f"line {line}: {message}", "line": line}})

    def _api_error(self, out: TextIO, summary: BatchSummary, job: _Job, err: ApiError) -> None:
        print(f"batch: line {job.line} (custom_id {job.custom_id!r}): {err.status} {err.message}",
              file=self.stderr, flush=True)
        summary.failed += 1
        self._write(out, {"id": new_id("batch_req"), "custom_id": job.custom_id,
                          "response": {"status_code": err.status, "request_id": job.request_id or None,
                                       "body": err.body()},
                          "error": None})

    def _success(self, out: TextIO, summary: BatchSummary, job: _Job, body: dict[str, Any]) -> None:
        summary.succeeded += 1
        self._write(out, {"id": new_id("batch_req"), "custom_id": job.custom_id,
                          "response": {"status_code": 200, "request_id": job.request_id, "body": body},
                          "error": None})

    # ------------------------------------------------------------------ parse

    def _parse(self, n: int, raw: str, seen: dict[str, int]) -> tuple[_Job | None, tuple[str, str, str | None] | None]:
        """Returns (job, None) or (None, (code, message, custom_id))."""
        try:
            rec = json.loads(raw)
        except ValueError as exc:
            return None, ("invalid_json", f"not valid JSON: {exc}", None)
        if not isinstance(rec, dict):
            return None, ("invalid_request", "must be a JSON object", None)
        cid = rec.get("custom_id")
        if not isinstance(cid, str) or not cid:
            return None, ("missing_custom_id", "'custom_id' must be a non-empty string", None)
        if cid in seen:
            return None, ("duplicate_custom_id", f"custom_id {cid!r} already used on line {seen[cid]}", None)
        seen[cid] = n
        method = rec.get("method", "POST")
        if method != "POST":
            return None, ("invalid_method", f"'method' must be \"POST\", got {method!r}", cid)
        url = rec.get("url")
        if url not in URLS:
            return None, ("invalid_url", f"'url' must be one of {', '.join(URLS)}, got {url!r}", cid)
        body = rec.get("body")
        if not isinstance(body, dict):
            return None, ("invalid_body", "'body' must be a JSON object", cid)
        job = _Job(line=n, custom_id=cid, url=url, request=body)
        return job, None

    # -------------------------------------------------------------------- run

    def _start(self, job: _Job) -> None:
        """Validate and add a job's engine requests; raises ApiError."""
        model_cls = URLS[job.url]
        try:
            req = model_cls.model_validate(job.request)
        except ValidationError as exc:
            raise validation_error_to_api(exc.errors()) from None
        job.request = req
        eng = self.engine
        if isinstance(req, EmbeddingRequest):
            return  # run synchronously by the caller
        conv = sampling_params(req, self.default_max_tokens)
        if req.stream:
            raise ApiError(400, "stream: streaming is not available in batch jobs", param="stream",
                           code="invalid_value")
        chat = isinstance(req, ChatCompletionRequest)
        job.request_id = new_id("chatcmpl" if chat else "cmpl")
        sources: list[Any] = [chat_messages(req)] if chat else completion_prompts(req)
        tools, template_tools = None, None
        if chat:
            tools, sources[0], template_tools, conv = chat_tools(req, sources[0], conv, eng.tokenizer)
        params = conv.params
        infos = [PromptInfo() for _ in sources]
        echo = bool(getattr(req, "echo", False))
        job.builder = ResponseBuilder(
            "chat" if chat else "completion", self.model_name, job.request_id, len(sources), params.n, params,
            decode=self.decode, top_logprobs=(req.top_logprobs or 0) if chat else 0, echo=echo, infos=infos,
            tools=tools,
        )
        job.finals = [None] * len(sources)
        added: list[str] = []
        try:
            for i, (src, info) in enumerate(zip(sources, infos)):
                prepare = make_prepare(src, conv, chat=chat, info=info, want_prompt_text=echo,
                                       tools=template_tools)
                ids, p = prepare(eng)
                rid = f"{job.request_id}-{i}"
                eng.add_request(ids, p, rid)
                added.append(rid)
        except ConfigError as exc:
            for rid in added:
                eng.abort(rid)
            raise config_error_to_api(exc, conv.aliases) from None
        job.rids = added
        job.remaining = len(added)

    def _embed(self, job: _Job) -> dict[str, Any]:
        req: EmbeddingRequest = job.request
        items = check_embedding_request(req, self.engine.model_config.hidden_size)
        try:
            results = embed_all(items)(self.engine)
        except ConfigError as exc:
            raise config_error_to_api(exc, INPUT_ALIASES) from None
        job.request_id = new_id("embd")
        return embeddings_response(self.model_name, results, req.encoding_format)

    def run(self, input_path: str | Path, output_path: str | Path) -> BatchSummary:
        input_path, output_path = Path(input_path), Path(output_path)
        if not input_path.is_file():
            raise ConfigError("INPUT", str(input_path), "is not a file")
        if output_path.resolve() == input_path.resolve():
            raise ConfigError("OUTPUT", str(output_path), "is the input file", "Write the results to another file")
        done_ids, done_lines = read_done(output_path)
        with open(input_path, encoding="utf-8", errors="replace") as f:
            total = sum(1 for raw in f if raw.strip())
        summary = BatchSummary(total_lines=total)
        bar = None
        if self.progress:
            bar = tqdm(total=total, desc="batch", unit="req", file=self.stderr, dynamic_ncols=True)
        t0 = time.perf_counter()
        eng = self.engine
        live: dict[str, _Job] = {}  # engine request id -> job
        tokens_seen: dict[str, int] = {}
        seen: dict[str, int] = {}
        pending = 0

        def tick(n: int = 1) -> None:
            if bar is not None:
                bar.update(n)
                elapsed = time.perf_counter() - t0
                bar.set_postfix_str(f"{summary.generated_tokens / elapsed if elapsed else 0:.1f} tok/s", refresh=False)

        def drain(out: TextIO, until: int) -> None:
            nonlocal pending
            while len(live) > until:
                try:
                    outputs = eng.step()
                except Exception as exc:  # fail what is running, keep going
                    log.exception("engine step failed")
                    for job in {id(j): j for j in live.values()}.values():
                        for rid in job.rids:
                            eng.abort(rid)
                        self._api_error(out, summary, job, ApiError(500, f"generation failed: {exc}",
                                                                    code="engine_error"))
                        tick()
                    live.clear()
                    pending = 0
                    return
                for o in outputs:
                    job = live.get(o.request_id)
                    if job is None:
                        continue
                    ntok = sum(len(c.token_ids) for c in o.outputs)
                    summary.generated_tokens += ntok - tokens_seen.get(o.request_id, 0)
                    tokens_seen[o.request_id] = ntok
                    if not o.finished:
                        continue
                    del live[o.request_id]
                    tokens_seen.pop(o.request_id, None)
                    job.finals[job.rids.index(o.request_id)] = o
                    job.remaining -= 1
                    summary.prompt_tokens += len(o.prompt_token_ids)
                    if job.remaining == 0:
                        pending -= 1
                        assert job.builder is not None
                        self._success(out, summary, job, job.builder.response(job.finals))
                        tick()
                if bar is not None and outputs:
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix_str(f"{summary.generated_tokens / elapsed if elapsed else 0:.1f} tok/s")

        with open(output_path, "a", encoding="utf-8") as out:
            try:
                with open(input_path, encoding="utf-8", errors="replace") as f:
                    n = 0
                    for n, raw in enumerate(f, 1):
                        if not raw.strip():
                            continue
                        job, bad = self._parse(n, raw, seen)
                        cid = job.custom_id if job is not None else (bad[2] if bad else None)
                        if (cid is not None and cid in done_ids) or (cid is None and n in done_lines):
                            summary.skipped += 1
                            tick()
                            continue
                        if bad is not None:
                            code, message, cid = bad
                            self._bad_line(out, summary, n, code, message, cid)
                            tick()
                            continue
                        assert job is not None
                        try:
                            self._start(job)
                            if isinstance(job.request, EmbeddingRequest):
                                self._success(out, summary, job, self._embed(job))
                                tick()
                                continue
                        except ApiError as err:
                            self._api_error(out, summary, job, err)
                            tick()
                            continue
                        pending += 1
                        for rid in job.rids:
                            live[rid] = job
                        if len(live) >= self.max_in_flight:
                            drain(out, self.max_in_flight // 2)
                drain(out, 0)
            except KeyboardInterrupt:
                summary.interrupted = True
                for rid in list(live):
                    eng.abort(rid)
                live.clear()
            finally:
                summary.seconds = time.perf_counter() - t0
                if bar is not None:
                    bar.close()
        return summary

