"""Per-request sampling settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmcore.errors import ConfigError
from llmcore.structured.spec import StructuredOutput


GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature == 0`` (anything below 1e-5) is greedy decoding (argmax; equals Hugging Face greedy
    output token for token on the same weights in float32). ``top_k == 0`` and
    ``top_p == 1`` disable those filters. ``structured_output`` constrains the text to a JSON
    schema, a regex, a choice or a grammar (:class:`~llmcore.structured.StructuredOutput`, or a
    dict of its fields such as ``{"json": schema}``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutput | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(option: str, problem: str, hint: str = "") -> ConfigError:
            return ConfigError(option, getattr(self, option), problem, hint)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise bad("max_tokens", "must be a positive integer", "Use max_tokens >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0", "Use 0 for greedy decoding, or a value like 0.7")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]", "Use 1.0 to disable nucleus sampling")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0", "Use 0 to disable top-k filtering")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]", "Use 0 to disable min-p filtering")
        if not 0.01 <= self.repetition_penalty <= 100.0:
            raise bad("repetition_penalty", "must be in [0.01, 100]", "Use 1.0 for no penalty")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]", "Use 0 for no penalty")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]", "Use 0 for no penalty")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be in [0, max_tokens={self.max_tokens}]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", "must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise bad("prompt_logprobs", "must be in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if self.stop is None:
            self._stop_list = []
        elif isinstance(self.stop, str):
            self._stop_list = [self.stop] if self.stop else []
        else:
            self._stop_list = [s for s in self.stop if s]
        if any(not isinstance(s, str) for s in self._stop_list):
            raise bad("stop", "must be a string or a list of strings")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < 2**31 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be token ids in [0, 2**31)")
        self.structured_output = StructuredOutput.coerce(self.structured_output)
        if self.structured_output is not None:
            # the grammar decides where the output ends: end-of-sequence is its to allow or refuse
            if self.ignore_eos:
                raise bad("ignore_eos", "cannot be combined with structured_output (the grammar ends the output)",
                          "Drop ignore_eos")
            if self.min_tokens:
                raise bad("min_tokens", "cannot be combined with structured_output (the grammar ends the output)",
                          "Drop min_tokens")

    @property
    def greedy(self) -> bool:
        # below this, dividing logits by the temperature overflows: it is greedy anyway
        return self.temperature < GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
