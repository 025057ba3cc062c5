"""Token-mask cost of the grammar libraries llmcore can use for structured output.

For each JSON schema below, a valid document is tokenized with the model's tokenizer and replayed
through each library's matcher: before each token the library fills the next-token bitmask
(timed), then the token is accepted. Prints, per library and schema: the compile time (cold, then
the matcher's first mask, which some libraries defer to), and the mask time per token (mean, p50,
p99) over ``--repeats`` replays. ``--batch N`` replays N matchers in lockstep through each
library's parallel batch call instead (the serving case: one call fills the masks of every
constrained sequence in the step) and reports the time of that call per step and per sequence.
xgrammar or llguidance may be missing: that library's rows are skipped.

    python benchmarks/grammar_mask_bench.py                 # embedded SmolLM2 (49,152 tokens)
    python benchmarks/grammar_mask_bench.py --model DIR --repeats 20
    python benchmarks/grammar_mask_bench.py --batch 64      # 64 sequences per step

Without ``--batch`` the figures are single-threaded (one matcher at a time). The machine and its
load matter: run it on an idle machine and report the CPU next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from llmcore.models.loader import resolve_model
from llmcore.models.tokenizer import Tokenizer

SCHEMAS = {
    "flat object": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested + arrays + enum": (
        {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 100000},
            "status": {"enum": ["active", "inactive", "banned"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "address": {"type": "object", "properties": {
                "street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}},
                "required": ["street", "zip", "geo"], "additionalProperties": False},
            "score": {"type": "number", "minimum": 0, "maximum": 1}},
         "required": ["id", "status", "tags", "address", "score"], "additionalProperties": False},
        {"id": 4211, "status": "active", "tags": ["alpha", "beta", "release candidate"],
         "address": {"street": "12 Rue de la Paix", "zip": "75002", "geo": [48.8686, 2.3317]},
         "score": 0.75},
    ),
}


def doc_tokens(tok: Tokenizer, doc) -> list[int]:
    return tok.hf.encode(json.dumps(doc), add_special_tokens=False)


def bench_llguidance(tok: Tokenizer, vocab: int, schema, tokens, repeats, batch):
    import llguidance  # optional: the grammar library being measured
    import llguidance.hf

    lltok = llguidance.hf.from_tokenizer(tok.hf, n_vocab=vocab, eos_token=tok.eos_token_ids)
    mask = torch.zeros((max(batch, 1), (vocab + 31) // 32), dtype=torch.int32)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    m = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    new = lambda: llguidance.LLMatcher(lltok, grammar)  # noqa: E731
    accept = lambda mt, t: mt.consume_token(t) and not mt.is_error()  # noqa: E731
    if batch:
        executor = llguidance.LLExecutor()
        fill = lambda ms: executor.unsafe_compute_mask_ptr(  # noqa: E731
            [(x, i) for i, x in enumerate(ms)], mask.data_ptr(), mask.shape[1] * 4, mask.shape[0])
    else:
        fill = lambda ms: ms[0].unsafe_compute_mask_ptr(mask.data_ptr(), mask.shape[1] * 4)  # noqa: E731
    return compile_s, _replay(new, fill, accept, m, tokens, repeats, batch)


def bench_xgrammar(tok: Tokenizer, vocab: int, schema, tokens, repeats, batch):
    import xgrammar  # optional: the grammar library being measured

    info = xgrammar.TokenizerInfo.from_huggingface(tok.hf, vocab_size=vocab, stop_token_ids=tok.eos_token_ids)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    mask = xgrammar.allocate_token_bitmask(max(batch, 1), vocab)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)  # as llmcore compiles
    m = xgrammar.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    new = lambda: xgrammar.GrammarMatcher(compiled)  # noqa: E731
    accept = lambda mt, t: mt.accept_token(t)  # noqa: E731
    if batch:
        batcher = xgrammar.BatchGrammarMatcher()
        fill = lambda ms: batcher.batch_fill_next_token_bitmask(ms, mask)  # noqa: E731
    else:
        fill = lambda ms: ms[0].fill_next_token_bitmask(mask)  # noqa: E731
    return compile_s, _replay(new, fill, accept, m, tokens, repeats, batch)


def _replay(new, fill, accept, first, tokens, repeats, batch):
    """Seconds per fill of ``max(batch, 1)`` matchers in lockstep over ``repeats`` replays.

    ``fill`` takes the list of matchers; the very first fill (where a library may build lazy
    tables) is returned apart.
    """
    times, first_mask = [], None
    for r in range(repeats):
        ms = [first if r == 0 and i == 0 else new() for i in range(max(batch, 1))]
        for t in tokens:
            t0 = time.perf_counter()
            fill(ms)
            dt = time.perf_counter() - t0
            if first_mask is None:
                first_mask = dt
            else:
                times.append(dt)
            if not all(accept(m, t) for m in ms):
                raise RuntimeError(f"a matcher refused token {t} of a valid document")
    return first_mask, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    ap.add_argument("--repeats", type=int, default=10, help="replays of each document (default 10)")
    ap.add_argument("--batch", type=int, default=0,
                    help="N sequences per step through the library's parallel batch call (default: one at a time)")
    args = ap.parse_args()
    folder = resolve_model(args.model)
    tok = Tokenizer(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"model {folder.name}, vocab {vocab}; repeats {args.repeats}; "
          + (f"batch {args.batch} (times per step; per sequence = step / batch)" if args.batch else "one sequence"))
    print(f"{'library':<11} {'schema':<24} {'tokens':>6} {'compile ms':>10} {'1st mask ms':>11} "
          f"{'mask us mean':>12} {'p50':>7} {'p99':>7}")
    for lib, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        for name, (schema, doc) in SCHEMAS.items():
            tokens = doc_tokens(tok, doc)
            try:
                compile_s, (first, times) = fn(tok, vocab, schema, tokens, args.repeats, args.batch)
            except ImportError as exc:
                print(f"{lib:<11} not installed ({exc})")
                break
            times.sort()
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            print(f"{lib:<11} {name:<24} {len(tokens):>6} {compile_s * 1e3:>10.1f} {first * 1e3:>11.2f} "
                  f"{statistics.mean(times) * 1e6:>12.1f} {statistics.median(times) * 1e6:>7.1f} "
                  f"{p99 * 1e6:>7.1f}")


if __name__ == "__main__":
    main()
