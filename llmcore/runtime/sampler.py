"""Token selection from logits: penalties, filters, seeded sampling, logprobs."""

from __future__ import annotations

import torch

from llmcore.contract import SampleResult, ScheduledSeq
from llmcore.outputs import Logprob


class Sampler:
    def __init__(self, eos_token_ids: list[int], seed: int, device: torch.device) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}
        # llmcore.structured.matchers.GrammarStates, set by the engine (llmcore.engine.structured)
        self.structured = None

    def release(self, rng_keys: list[str]) -> None:
        for k in rng_keys:
            self.generators.pop(k, None)
        if self.structured is not None:
            self.structured.release(rng_keys)

    def _generator(self, key: str, seed: int | None) -> torch.Generator:
        if seed is None:
            return self.default_generator
        g = self.generators.get(key)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed)
            self.generators[key] = g
        return g

    def __call__(self, logits: torch.Tensor, entries: list[ScheduledSeq]) -> list[SampleResult]:
        """``logits`` has one float32 row per entry (the entry's last position).

        Constrained entries' rows are masked in place first; their matchers take the tokens after.
        """
        constrained = self.structured is not None and self.structured.apply(logits, entries)
        results = self._sample(logits, entries)
        if constrained:
            self.structured.accept(entries, results)
        return results

    def _sample(self, logits: torch.Tensor, entries: list[ScheduledSeq]) -> list[SampleResult]:
        simple = all(
            e.params.greedy and not e.params.needs_penalties and e.params.logprobs is None
            and e.num_samples == 1 and e.params.min_tokens == 0
            for e in entries
        )
        if simple:
            ids = logits.argmax(dim=-1).tolist()
            return [SampleResult(token_ids=[t]) for t in ids]
        return [self._sample_row(logits[i], e) for i, e in enumerate(entries)]

    def _sample_row(self, row: torch.Tensor, e: ScheduledSeq) -> SampleResult:
        p = e.params
        row = row.clone()
        if p.needs_penalties:
            row = self._apply_penalties(row, e)
        row = torch.nan_to_num(row, nan=float("-inf"), posinf=torch.finfo(row.dtype).max)
        num_out = len(e.history) - e.num_prompt_tokens
        if num_out < p.min_tokens:
            banned = [t for t in (*self.eos_token_ids, *p.stop_token_ids) if 0 <= t < row.shape[0]]
            if banned:
                row[banned] = float("-inf")
        logprobs_all = torch.log_softmax(row, dim=-1)
        tokens: list[int] = []
        if p.greedy:
            tokens = [int(row.argmax())] * e.num_samples
        else:
            probs = self._filtered_probs(row, p)
            for key, seed in zip(e.rng_keys or [""] * e.num_samples, e.seeds or [None] * e.num_samples):
                g = self._generator(key, seed)
                tokens.append(int(torch.multinomial(probs, 1, generator=g)))
        chosen = [float(logprobs_all[t]) for t in tokens]
        lp = None
        if p.logprobs is not None:
            lp = []
            top = torch.topk(logprobs_all, p.logprobs) if p.logprobs > 0 else None
            for t in tokens:
                d = {t: Logprob(t, float(logprobs_all[t]))}
                if top is not None:
                    for v, i in zip(top.values.tolist(), top.indices.tolist()):
                        d.setdefault(i, Logprob(i, v))
                lp.append(d)
        return SampleResult(token_ids=tokens, logprobs=lp, chosen_logprobs=chosen)

    @staticmethod
    def _apply_penalties(row: torch.Tensor, e: ScheduledSeq) -> torch.Tensor:
        p = e.params
        vocab = row.shape[0]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({t for t in e.history if t < vocab}), dtype=torch.long, device=row.device)
            if seen.numel():
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = [t for t in e.history[e.num_prompt_tokens :] if t < vocab]
            if out:
                counts = torch.bincount(torch.tensor(out, device=row.device), minlength=vocab).to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return row

    @staticmethod
    def _filtered_probs(row: torch.Tensor, p) -> torch.Tensor:
        row = row / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cum = sorted_probs.cumsum(0)
            remove = cum - sorted_probs > p.top_p  # keep the token that crosses top_p
            sorted_probs[remove] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return probs / probs.sum()
