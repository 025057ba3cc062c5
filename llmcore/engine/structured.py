"""The engine's side of structured output: refuse what the device cannot do, compile, hand the
sampler its grammar states.

One :class:`StructuredOutputs` per engine. ``check(params)`` runs when a request is added: it
refuses a constrained request on a device whose logits never reach llmcore's sampler (naming the
device and what would work), compiles the constraint (cached) and checks it can end within
``max_tokens``. ``attach(runner)`` gives the runner's sampler a
:class:`~llmcore.structured.matchers.GrammarStates`.
"""

from __future__ import annotations

from typing import Any

from llmcore.errors import RequestError
from llmcore.runtime.sampler import Sampler
from llmcore.sampling_params import SamplingParams
from llmcore.structured.compiler import GrammarCompiler
from llmcore.structured.matchers import GrammarStates
from llmcore.structured.spec import OPTION


def find_sampler(runner: Any) -> Sampler | None:
    """llmcore's sampler inside ``runner`` (or the local rank's runner of a parallel one)."""
    for obj in (runner, getattr(runner, "runner", None), getattr(runner, "eager", None)):
        s = getattr(obj, "sampler", None)
        if isinstance(s, Sampler):
            return s
    return None


class StructuredOutputs:
    def __init__(self, tokenizer: Any, vocab_size: int, probe: Any, runner: Any) -> None:
        self.device = probe.name
        self.compiler = GrammarCompiler(tokenizer.hf, vocab_size, tokenizer.eos_token_ids)
        self.reason = ""
        if not getattr(probe.capabilities, "structured_output", True):
            self.reason = "its capabilities say it never returns logits to llmcore's sampler"
        sampler = find_sampler(runner) if not self.reason else None
        if sampler is None and not self.reason:
            self.reason = f"its runner ({type(runner).__name__}) does not sample with llmcore's Sampler"
        self.states = None
        if sampler is not None:
            self.states = GrammarStates(self.compiler.compile, vocab_size, tokenizer.eos_token_ids)
            sampler.structured = self.states

    @property
    def supported(self) -> bool:
        return self.states is not None

    def check(self, params: SamplingParams) -> None:
        """Refuse or compile a request's constraint; nothing to do for an unconstrained one."""
        spec = params.structured_output
        if spec is None:
            return
        if not self.supported:
            raise RequestError(
                OPTION, spec.form, f"device {self.device!r} cannot constrain decoding: {self.reason}",
                "Serve this model on a device whose 'llmcore devices' row says structured=yes "
                "(cpu, cuda, and neuron/rbln with host sampling), or drop the constraint",
            )
        self.compiler.compile(spec)
        self.compiler.check_fits(spec, params.max_tokens)

    def compile(self, spec: Any) -> Any:
        """Compile (or find cached) ``spec``; thread-safe, for callers that compile off the step loop."""
        return self.compiler.compile(spec)
