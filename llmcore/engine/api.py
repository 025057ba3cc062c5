"""The engine's convenience API: generate, stream, chat, embed (mixed into :class:`Engine`).

Everything here is built on ``add_request``, ``step`` and ``abort`` of
:class:`llmcore.engine.engine.Engine`.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence as Seq

from tqdm.auto import tqdm

from llmcore.errors import ConfigError, RequestError
from llmcore.outputs import RequestOutput, StreamDelta
from llmcore.sampling_params import SamplingParams


class GenerateAPI:
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
                ids.append(self.add_request(p, sp, final_only=True))
        except Exception:
            for rid in ids:
                self.abort(rid)
            raise
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
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
                        hold = 0 if o.finished else self.out.holdback(req.params)
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
                if not outs and not self.scheduler.has_work() and not self.output_pending():
                    return
        finally:
            if rid in self._requests:
                self.abort(rid)

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



