"""The overlapped-execution contract on the host: ``launch`` for any synchronous runner.

:class:`HostLaunch` gives a runner that only has ``execute`` the ``launch`` half of the
contract (:class:`llmcore.device.ModelRunner`): it fills each placeholder token from the
results of the step launched before, executes, and returns a handle whose results are ready.
Nothing overlaps on the device, but the engine runs its overlapped loop (placeholders, stops
found one step late, discarded tokens) exactly as with an asynchronous runner: tests compare it
with the synchronous loop on the CPU (``EngineConfig.async_scheduling=True``).
"""

from __future__ import annotations

from typing import Any

from llmcore.contract import PLACEHOLDER_TOKEN, DoneStep, ScheduledBatch


class HostLaunch:
    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._last: dict[int, int] = {}  # seq_id -> token sampled by the previous launch

    def launch(self, batch: ScheduledBatch) -> DoneStep:
        last = self._last
        for e in batch.seqs:
            if e.token_ids and e.token_ids[0] == PLACEHOLDER_TOKEN:
                if e.seq_id not in last:
                    raise RuntimeError(f"seq {e.seq_id}: placeholder token but no token from the previous step")
                e.token_ids[0] = last[e.seq_id]
        results = self.runner.execute(batch)
        self._last = {e.seq_id: r.token_ids[0] for e, r in zip(batch.seqs, results)
                      if r is not None and e.sample and r.token_ids}
        return DoneStep(results)
