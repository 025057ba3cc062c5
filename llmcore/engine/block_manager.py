"""KV-cache blocks: allocation, reference counts, prefix caching, copy-on-write.

Plain Python, no torch: the block manager only decides *which* block ids a
sequence uses; the runner owns the tensors behind them.

Prefix caching: a full block's hash chains over every token before it
(``hash((parent_hash, tokens))``), so equal hashes mean equal prefixes. A hit is
confirmed by comparing the tokens. Freed blocks keep their contents and hash and
wait in an LRU free list; they are reused on a hit or evicted (oldest first)
when a fresh block is needed. A finished sequence releases its blocks tail
first, so its tail is evicted before the prefix other requests are likely to
share.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, Sequence


class BlockSeq(Protocol):
    """What the block manager needs to know about a sequence."""

    block_table: list[int]
    num_hashed_blocks: int

    @property
    def token_ids(self) -> Sequence[int]: ...


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class BlockStats:
    num_blocks: int
    used: int
    free: int
    cached_free: int  # free blocks still holding a reusable prefix
    prefix_queries: int
    prefix_hits: int  # tokens found in cache
    prefix_queried_tokens: int
    evictions: int

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


def _changed(seq: BlockSeq) -> None:
    """Tell runners caching ``seq``'s table row that an entry it holds changed (not an append)."""
    if hasattr(seq, "blocks_version"):
        seq.blocks_version += 1


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    _free: OrderedDict[int, None] = field(init=False)  # LRU: first = evict first
    _cached: dict[int, int] = field(init=False)  # hash -> block id
    _stats: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free = OrderedDict((i, None) for i in range(self.num_blocks))
        self._cached = {}
        self._stats = dict(queries=0, hits=0, queried=0, evictions=0)

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def stats(self) -> BlockStats:
        cached_free = sum(1 for b in self._free if self.blocks[b].hash is not None)
        return BlockStats(
            num_blocks=self.num_blocks,
            used=self.num_blocks - len(self._free),
            free=len(self._free),
            cached_free=cached_free,
            prefix_queries=self._stats["queries"],
            prefix_hits=self._stats["hits"],
            prefix_queried_tokens=self._stats["queried"],
            evictions=self._stats["evictions"],
        )

    # --------------------------------------------------------------- internals

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = None
            block.token_ids = ()
            self._stats["evictions"] += 1
        block.ref_count = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released with ref_count {block.ref_count}")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None  # most recently used: evicted last

    # -------------------------------------------------------------- allocation

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached prefix of ``token_ids``.

        At least one token is left uncached so the model computes logits for
        the last prompt token.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        hits: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            block_id = self._cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            parent = h
        return hits

    def can_allocate_prompt(self, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Whether a new sequence reusing ``cached`` blocks can hold ``num_tokens``."""
        need = self.blocks_needed(num_tokens) - len(cached)
        # a cached block sitting in the free list leaves it when the hit takes it
        reclaimed = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return need <= len(self._free) - reclaimed

    def allocate_prompt(self, seq: BlockSeq, cached: Sequence[int]) -> int:
        """Start a sequence's block table with prefix-cache hits; return cached tokens."""
        assert not seq.block_table, "sequence already has blocks"
        self._stats["queries"] += 1
        self._stats["queried"] += max(len(seq.token_ids) - 1, 0)
        for block_id in cached:
            self._acquire(block_id)
            seq.block_table.append(block_id)
        seq.num_hashed_blocks = len(cached)
        num_cached = len(cached) * self.block_size
        self._stats["hits"] += num_cached
        return num_cached

    def ensure_slots(self, seq: BlockSeq, num_tokens: int) -> list[tuple[int, int]]:
        """Grow ``seq``'s table to hold ``num_tokens`` tokens.

        Returns copy-on-write pairs ``(src, dst)``: when the block that the next
        token will be written into is shared (``n > 1`` samples forked from one
        prompt), the sequence gets a private copy first. Callers check
        :meth:`can_allocate` (plus one block per COW) beforehand.
        """
        copies: list[tuple[int, int]] = []
        for idx in self._write_range(seq, num_tokens):
            old = seq.block_table[idx]
            if self.blocks[old].ref_count > 1:
                new = self._take_free()
                self.blocks[old].ref_count -= 1
                seq.block_table[idx] = new
                copies.append((old, new))
                _changed(seq)
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take_free())
        return copies

    def _write_range(self, seq: BlockSeq, num_tokens: int) -> range:
        """Indices of already-held blocks that this step writes into."""
        start = getattr(seq, "num_computed_tokens", 0) // self.block_size
        end = min(len(seq.block_table), self.blocks_needed(num_tokens))
        return range(start, end)

    def writes_own_block(self, seq: BlockSeq, pos: int) -> bool:
        """Whether the slot of position ``pos`` is in a block ``seq`` already holds alone (O(1))."""
        idx = pos // self.block_size
        return idx < len(seq.block_table) and self.blocks[seq.block_table[idx]].ref_count == 1

    def blocks_to_grow(self, seq: BlockSeq, num_tokens: int) -> int:
        """Fresh blocks ``ensure_slots(seq, num_tokens)`` would take (growth + COW)."""
        cow = sum(
            1 for i in self._write_range(seq, num_tokens)
            if self.blocks[seq.block_table[i]].ref_count > 1
        )
        return max(self.blocks_needed(num_tokens) - len(seq.block_table), 0) + cow

    def fork(self, parent: BlockSeq, child: BlockSeq) -> None:
        """Share every block of ``parent`` with ``child`` (ref counts, no copy)."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_hashed_blocks = parent.num_hashed_blocks

    def commit_full_blocks(self, seq: BlockSeq, num_computed: int) -> None:
        """Publish newly computed full blocks of ``seq`` to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(num_computed // bs, len(seq.block_table))
        if full <= seq.num_hashed_blocks:
            return
        tokens = seq.token_ids
        parent = None
        if seq.num_hashed_blocks:
            parent = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash
        for idx in range(seq.num_hashed_blocks, full):
            chunk = tuple(tokens[idx * bs : (idx + 1) * bs])
            h = block_hash(parent, chunk)
            block = self.blocks[seq.block_table[idx]]
            if block.hash is None:
                block.hash = h
                block.token_ids = chunk
                self._cached.setdefault(h, block.block_id)
            parent = h
        seq.num_hashed_blocks = full

    def free(self, seq: BlockSeq) -> None:
        """Release every block of ``seq``, tail first (tails are evicted first)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()
        seq.num_hashed_blocks = 0
        _changed(seq)

    def check_invariants(self) -> None:
        """Raise if bookkeeping is inconsistent (used by property tests)."""
        for block in self.blocks:
            in_free = block.block_id in self._free
            if block.ref_count < 0:
                raise AssertionError(f"block {block.block_id} has ref_count {block.ref_count}")
            if (block.ref_count == 0) != in_free:
                raise AssertionError(
                    f"block {block.block_id}: ref_count={block.ref_count} but in_free={in_free}"
                )
        for h, block_id in self._cached.items():
            if self.blocks[block_id].hash != h:
                raise AssertionError(f"cache map points {h} at block {block_id} with another hash")
