"""Fixed batch slots for static-graph runners (neuron, rbln, and any compiled device).

A static graph has ``batch_size`` KV regions; each live sequence (keyed by its
``ScheduledSeq.key``, stable across preemption) holds one until it leaves.
"""

from __future__ import annotations

from llmcore.errors import RequestError

PAD_TOKEN = 0


class SlotTable:
    """Which sequence key holds which slot, and what that slot's KV holds."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.by_key: dict[str, int] = {}
        self.length: list[int] = [0] * num_slots  # tokens in the slot's KV (0: free or pending)
        self.last_token: list[int] = [PAD_TOKEN] * num_slots

    def get(self, key: str) -> int | None:
        return self.by_key.get(key)

    def assign(self, key: str) -> int:
        slot = self.by_key.get(key)
        if slot is None:
            used = set(self.by_key.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if not free:
                raise RequestError(
                    "batch", len(used) + 1,
                    f"exceeds the compiled batch size {self.num_slots} (slots held by "
                    f"{', '.join(sorted(self.by_key))})",
                    f"Serve at most {self.num_slots} sequences at once, or recompile with a larger "
                    "--batch-size",
                )
            slot = self.by_key[key] = free[0]
        self.length[slot] = 0
        return slot

    def release(self, keys) -> None:
        for key in keys:
            slot = self.by_key.pop(key, None)
            if slot is not None:
                self.length[slot] = 0
                self.last_token[slot] = PAD_TOKEN
