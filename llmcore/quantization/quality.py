"""Quality and memory measures for a loaded engine: perplexity, weight bytes, peak RSS."""

from __future__ import annotations

import math
import resource
from pathlib import Path

from llmcore.sampling_params import SamplingParams

#: Fixed local text shipped with the tests (prose written for the project).
PERPLEXITY_TEXT = Path(__file__).resolve().parents[2] / "tests" / "data" / "perplexity.txt"


def token_nlls(engine, token_ids: list[int], window: int = 1024) -> list[float]:
    """Negative log-likelihood of each token after the first, through the engine's own forward.

    The text is cut into windows of ``window`` tokens (each scored with its own
    window as context), so any length fits the engine's ``max_model_len``.
    """
    window = min(window, engine.max_model_len - 1)
    nlls: list[float] = []
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        out = engine.generate([chunk], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
        for tok, entry in zip(chunk[1:], out.prompt_logprobs[1:]):
            nlls.append(-entry[tok].logprob)
    return nlls


def perplexity(engine, text: str | None = None, max_tokens: int | None = None, window: int = 1024) -> float:
    """exp(mean NLL) of ``text`` (default: the shipped text), first ``max_tokens`` tokens."""
    if text is None:
        text = PERPLEXITY_TEXT.read_text()
    ids = engine.tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nlls = token_nlls(engine, ids, window)
    return math.exp(sum(nlls) / len(nlls))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
