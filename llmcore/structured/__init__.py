"""Structured output: constrain generated text to a JSON schema, a regex, a choice or a grammar.

- :mod:`llmcore.structured.spec`: :class:`StructuredOutput`, the constraint (plain data, in
  :class:`~llmcore.SamplingParams`).
- :mod:`llmcore.structured.compiler`: constraint -> compiled grammar (xgrammar), cached.
- :mod:`llmcore.structured.matchers`: per-sequence grammar state; the token mask applied to the
  logits on their device.
- :mod:`llmcore.engine.structured`: the engine's side (device check, compile, sampler hook).
- :mod:`llmcore.structured.openai`: OpenAI/vLLM request fields -> :class:`StructuredOutput`.

Only the constraint is imported here, so ``import llmcore`` stays light.
"""

from llmcore.structured.spec import StructuredOutput

__all__ = ["StructuredOutput"]
