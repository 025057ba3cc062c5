"""The device object the engine drives, and the runner protocol.

A plugin's ``llmcore_create_device`` returns a :class:`Device`. The engine asks
it for a runner (the object that owns the model's tensors and executes a
ScheduledBatch (:mod:`llmcore.contract`)) and for its KV-cache budget.
Devices built on torch eager (cpu, cuda) reuse
:class:`~llmcore.runtime.runner.TorchModelRunner` with their own attention
backend; static-graph devices (neuron, rbln) bring their own runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llmcore.capabilities import Capabilities, DeviceProbe
from llmcore.compiled.plan import plan_static
from llmcore.errors import PluginError

if TYPE_CHECKING:
    from llmcore.config import EngineConfig
    from llmcore.contract import SampleResult, ScheduledBatch, StepHandle
    from llmcore.models.config import ModelConfig
    from llmcore.compiled.plan import StaticPlan
    from llmcore.parallel.tensor_parallel import TPGroup


class ModelRunner(Protocol):
    """Everything the engine calls on a runner; implemented by each device family.

    Required: :meth:`kv_bytes_per_block`, :meth:`allocate_kv_cache`, :meth:`execute`,
    :meth:`embed`. Optional (the engine looks them up with ``getattr`` and does without):
    :meth:`set_num_threads`, :meth:`shutdown` and the overlapped-execution capability
    :meth:`launch`. A runner written before ``launch`` existed keeps working unchanged: the
    engine then runs every step synchronously.
    """

    def kv_bytes_per_block(self) -> int:
        """Bytes one KV block takes across all layers (sizes the cache)."""

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` KV blocks; called once before the first step."""

    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        """Run one step and wait for it; a result per scheduled sequence (None if nothing sampled).

        Also called with no sequences when only ``finished_keys`` or ``block_copies`` are set.
        """

    def embed(self, token_ids: list[int]) -> Any:
        """Mean-pooled last hidden state of ``token_ids`` (a 1-D tensor; no KV cache kept)."""

    # ------------------------------------------------------------- optional

    def set_num_threads(self, n: int) -> None:
        """Optional: use ``n`` host threads (``EngineConfig.num_threads``)."""

    def shutdown(self) -> None:
        """Optional: stop what the runner runs outside this process (idempotent)."""

    def launch(self, batch: ScheduledBatch) -> StepHandle:
        """Optional capability, overlapped execution: start a step and return without waiting.

        The engine then schedules and launches the next step before it calls
        ``handle.result()`` of this one, and processes this step's outputs while the device
        runs the next one; handles are read in launch order, each once. Contract:

        * A scheduled ``token_ids`` entry equal to :data:`llmcore.contract.PLACEHOLDER_TOKEN`
          stands for the token the same sequence (``seq_id``) sampled in the step launched just
          before; the runner feeds it from its own copy (on the device: no host round trip).
          Only a sequence's single decode token is ever a placeholder, and the engine never
          sends one for a sequence whose sampling needs its history (penalties) or that forks
          (``num_samples > 1``): those steps it waits for before scheduling the next.
        * Steps run in launch order on the device, so a KV block freed by the engine while a
          step that writes it is in flight (an abort, a stop found one step late) can be handed
          to a later step at once.
        * A sequence may have finished while a step computing it was in flight; the engine
          discards that result.

        Without ``launch`` the engine calls :meth:`execute` and every step is synchronous.
        With it, the engine uses it unless ``EngineConfig.async_scheduling`` is False, or is
        None and the runner sets the class attribute ``launch_by_default = False`` (an
        implementation not yet measured faster than its own synchronous loop keeps it opt-in).
        ``llmcore.runtime.overlap.HostLaunch`` runs the same loop over :meth:`execute` for a
        runner without it when ``async_scheduling=True`` (results ready at once; tests use it);
        the CUDA plugin's runner overlaps for real.
        """


class Device:
    """Base class for devices. Subclasses implement :meth:`create_runner`.

    Optional members have defaults that state the conservative answer.
    """

    #: torch.distributed backend for run-time tensor parallelism (``llmcore.parallel``): a device
    #: that sets it ("nccl", "gloo") accepts ``create_runner(..., tp=group)`` and builds rank
    #: ``group.rank``'s runner (its shard, on its device ``r``). None: not supported.
    tensor_parallel_backend: str | None = None

    def __init__(self, probe: DeviceProbe, config: EngineConfig) -> None:
        self.probe = probe
        self.config = config

    def tensor_parallel_limit(self) -> tuple[int, str]:
        """The most tensor-parallel ranks this device can run here, and what they are ("GPUs")."""
        return self.capabilities.device_count, "devices"

    @property
    def name(self) -> str:
        return self.probe.name

    @property
    def block_size(self) -> int:
        """KV block size in tokens: the user's ``block_size``, else the device's default."""
        return self.config.block_size or self.capabilities.default_block_size

    @property
    def capabilities(self) -> Capabilities:
        return self.probe.capabilities

    def resolve_dtype(self, requested: str) -> str:
        """Turn ``"auto"`` into a concrete dtype; validation already happened."""
        return self.capabilities.default_dtype if requested == "auto" else requested

    def create_runner(
        self, model_config: ModelConfig, folder: Path, dtype: str, eos_token_ids: list[int],
        max_model_len: int, tp: TPGroup | None = None,
    ) -> ModelRunner:
        raise NotImplementedError(f"device {self.name!r} does not implement create_runner")

    # ------------------------------------------------- ahead-of-time compile
    # Devices with ``capabilities.needs_compile`` (neuron, rbln) and devices
    # offering an optional compiled mode (cpu) implement these two.

    def plan(self, model_config: ModelConfig, **settings: Any) -> StaticPlan:
        """The static plan this device would compile for ``settings``.

        ``settings`` are :func:`~llmcore.compiled.plan.plan_static`'s keywords
        (``batch_size``, ``max_seq_len``, ``dtype``, ``tensor_parallel``,
        ``quantization``, ``batch_buckets``, ``seq_buckets``, ``block_size``).
        The default is ``plan_static`` with this device's capabilities; a device
        whose compiler has further rules (one decode graph only, KV block sizes
        tied to its attention kernel) overrides it, so ``llmcore compile`` can
        show and validate the plan that will really be compiled.
        """

        return plan_static(model_config, self.capabilities, self.name, **settings)

    def compile_key_inputs(self, plan: StaticPlan) -> dict[str, Any]:
        """Compiler name/version/flags that go into the compile-cache key.

        :returns: ``{"compiler", "compiler_version", "compiler_flags"}`` and
            optionally ``"target"`` (the hardware the code is built for, e.g. a
            CPU feature set or NPU generation) and ``"extra"`` (a dict of anything
            else the artifact depends on). ``llmcore.compiled.keys.build_key``
            puts them in the key, and serving recomputes them to refuse an
            artifact built for another environment.
        """
        return {"compiler": "none", "compiler_version": "0", "compiler_flags": {}}

    def compile(
        self, model_path: Path, model_config: ModelConfig, plan: StaticPlan, out_dir: Path,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Compile the model for ``plan`` into ``out_dir`` (a fresh temp dir of the cache).

        :returns: metadata (json-able) stored in the cache entry's manifest next
            to ``plan.to_dict()``, e.g. the vendor's own config file contents.
        """

        raise PluginError(f"device {self.name!r} has no ahead-of-time compile step")

    def create_static_runner(
        self, artifact_dir: Path, plan: StaticPlan, model_config: ModelConfig, model_path: Path,
        eos_token_ids: list[int],
    ) -> ModelRunner:
        """A runner serving a compiled artifact with the plan's fixed slots and buckets."""

        raise PluginError(f"device {self.name!r} cannot serve compiled artifacts")

    def kv_cache_bytes(self, runner: ModelRunner) -> int | None:
        """Bytes to give the KV cache after weights are loaded (None: engine default)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.probe.to_dict()}
