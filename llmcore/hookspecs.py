"""The llmcore plugin contract: every hook a plugin may implement.

A plugin is a module (or object) with functions named like the specs below,
decorated with :data:`llmcore.hookimpl`, plus a module attribute
``LLMCORE_CONTRACT_VERSION`` naming the contract it was written for. Plugins are
found through the entry-point group ``llmcore.plugins``; the built-in devices
(cpu, cuda, neuron, rbln) are registered through that same group.

Hooks are grouped by phase. Pluggy is used for discovery and configuration only:
the per-step loop calls the :class:`llmcore.device.Device` object directly, so
hook dispatch never sits on the hot path.

The contract version is bumped only when a hook changes incompatibly; adding a
hook with a documented default is not a break.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from llmcore.capabilities import DeviceProbe, QuantMethod
    from llmcore.config import EngineConfig
    from llmcore.device import Device
    from llmcore.outputs import RequestOutput

PROJECT = "llmcore"
CONTRACT_VERSION = 1
#: Contract versions this core accepts. A plugin declaring another is refused.
SUPPORTED_CONTRACT_VERSIONS = (1,)

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------
# Discovery: cheap questions, answered before any model is loaded.
# ---------------------------------------------------------------------------


@hookspec
def llmcore_probe(config: dict[str, Any]) -> DeviceProbe | list[DeviceProbe] | None:
    """Say whether this plugin's device can run here, how well, and what it can do.

    Called once per process by ``llmcore devices`` and by automatic device
    selection. Must be cheap and side-effect free: no model load, no compile,
    no device memory allocation, and vendor SDKs imported lazily inside the
    function (a missing SDK is an answer, score 0, never an ImportError).

    :param config: user settings that may change the answer (for example
        ``{"device": "cuda"}``); plugins may ignore it.
    :returns: a :class:`~llmcore.capabilities.DeviceProbe` (or a list of them
        when one plugin drives several device kinds), or ``None`` if the plugin
        has no device to offer. A probe with ``score == 0`` must carry a
        ``reason`` and, where one exists, a ``hint`` saying what would fix it.

    Every plugin is asked; the results are collected, not first-result.
    Exceptions raised here are caught and reported as score 0 with the error as
    the reason, so one broken plugin never stops the start.
    """


@hookspec
def llmcore_quantization_methods() -> list[QuantMethod] | None:
    """Contribute quantization methods to the registry.

    :returns: a list of :class:`~llmcore.quantization.QuantMethod`, each naming
        the devices and dtypes it supports, whether it needs a pre-quantized
        checkpoint, and its loader. The engine refuses an unsupported
        device/method pair before weights load, naming what would work.
    """


@hookspec
def llmcore_model_architectures() -> dict[str, type] | None:
    """Contribute model implementations.

    :returns: a mapping from the Hugging Face ``architectures`` name (for
        example ``"LlamaForCausalLM"``) to a ``torch.nn.Module`` class with the
        constructor ``cls(config: ModelConfig)``. Later registrations do not
        override built-ins; a clash is reported at start.
    """


# ---------------------------------------------------------------------------
# Creation: build the device object the engine drives.
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def llmcore_create_device(name: str, config: EngineConfig) -> Device | None:
    """Create the device object for ``name``.

    Only the plugin that owns ``name`` answers; all others return ``None``.

    :param name: the selected device name (``--device`` or the best probe).
    :param config: the validated engine configuration.
    :returns: a :class:`~llmcore.device.Device`. Stops at the first non-None
        result (firstresult). Its runner implements :class:`~llmcore.device.ModelRunner`;
        the optional ``launch`` method there (overlapped execution: the engine launches step
        n+1 before reading step n's tokens) has a synchronous default, so a runner with only
        ``execute`` keeps working.
    """


# ---------------------------------------------------------------------------
# Events for observers (metrics, logging). Called from the engine thread;
# implementations must be quick and must not raise.
# ---------------------------------------------------------------------------


@hookspec
def llmcore_request_finished(output: RequestOutput, stats: dict[str, Any]) -> None:
    """A request finished (stop, length, or abort).

    :param output: the final :class:`~llmcore.outputs.RequestOutput`.
    :param stats: per-request timings: ``arrival_time``, ``first_token_time``,
        ``finish_time``, ``num_prompt_tokens``, ``num_generated_tokens``,
        ``num_cached_tokens``.
    """


@hookspec
def llmcore_step_stats(stats: dict[str, Any]) -> None:
    """One engine step completed.

    :param stats: ``num_running``, ``num_waiting``, ``num_prefill_tokens``,
        ``num_decode_tokens``, ``kv_blocks_used``, ``kv_blocks_total``,
        ``step_seconds``.
    """
