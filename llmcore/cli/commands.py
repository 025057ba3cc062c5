"""What ``llmcore generate`` and ``llmcore quantize`` do once their options are parsed.

Kept apart from the option definitions (:mod:`llmcore.cli.generate`, :mod:`llmcore.cli.quantize`)
because it loads torch: the main CLI imports this module only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from llmcore.cli.options import engine_kwargs
from llmcore.engine.engine import Engine
from llmcore.errors import ConfigError
from llmcore.outputs import StreamDelta
from llmcore.quantization.awq_calibrate import quantize_awq
from llmcore.sampling_params import SamplingParams

# ------------------------------------------------------------------ generate


def read_prompts(file: str | None, prompt: str | None) -> list[str]:
    """The prompt, or the non-empty lines of ``file`` (``-``: stdin)."""
    if file:
        try:
            stream = sys.stdin if file == "-" else open(file, encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("--file", file, "does not exist", "Give a text file with one prompt per line") from None
        except OSError as exc:
            raise ConfigError("--file", file, f"cannot be read ({exc.strerror or exc})") from None
        with stream:
            try:
                prompts = [line.rstrip("\n") for line in stream if line.strip()]
            except UnicodeDecodeError as exc:
                raise ConfigError("--file", file, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not prompts:
            raise ConfigError("--file", file, "contains no prompts", "Put one prompt per line")
        return prompts
    if prompt is None:
        raise ConfigError("prompt", None, "is missing", 'Pass a prompt ("Hello") or --file prompts.txt')
    return [prompt]


class SamplePrinter:
    """Prints the ``n`` samples of one streamed prompt one after the other, each under a label.

    The sample being shown is printed as it is generated; the others are kept until their turn,
    then printed up to where they stand and followed live.
    """

    def __init__(self, n: int, out: TextIO) -> None:
        self.n = n
        self.out = out
        self.current = 0
        self.pending: dict[int, list[str]] = {i: [] for i in range(n)}
        self.finished: set[int] = set()
        self._label(0)

    def _label(self, i: int) -> None:
        if self.n > 1:
            newline = "\n" if i else ""  # end the previous sample's text
            print(f"{newline}--- sample {i}", file=self.out, flush=True)

    def add(self, delta: StreamDelta) -> None:
        if delta.index == self.current:
            print(delta.text, end="", file=self.out, flush=True)
        else:
            self.pending[delta.index].append(delta.text)
        if delta.finish_reason is not None:
            self.finished.add(delta.index)
        while self.current in self.finished and self.current + 1 < self.n:
            self.current += 1
            self._label(self.current)
            print("".join(self.pending.pop(self.current)), end="", file=self.out, flush=True)

    def close(self) -> None:
        """Print what is left (samples that never finished, e.g. on an interrupted stream)."""
        for i in range(self.current + 1, self.n):
            self._label(i)
            print("".join(self.pending.pop(i, [])), end="", file=self.out)
        print(file=self.out, flush=True)


def _stream(engine: Engine, prompts: list[str], texts: list[str], params: SamplingParams, as_json: bool) -> int:
    total = 0
    for prompt, text in zip(prompts, texts):
        printer = None
        if not as_json:
            if len(prompts) > 1:
                print(f"### {prompt}")
            printer = SamplePrinter(params.n, sys.stdout)
        for delta in engine.stream(text, params):
            total += len(delta.token_ids)
            if printer is None:
                print(json.dumps({"prompt": prompt, "index": delta.index, "text": delta.text,
                                  "token_ids": delta.token_ids, "finish_reason": delta.finish_reason}), flush=True)
            else:
                printer.add(delta)
        if printer is not None:
            printer.close()
    return total


def _print_outputs(prompts: list[str], outs: list, as_json: bool) -> int:
    total = 0
    for prompt, out in zip(prompts, outs):
        total += sum(len(o.token_ids) for o in out.outputs)
        if as_json:
            print(json.dumps({
                "prompt": prompt,
                "outputs": [{"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                            for o in out.outputs],
            }))
            continue
        if len(prompts) > 1:
            print(f"### {prompt}")
        for o in out.outputs:
            if len(out.outputs) > 1:
                print(f"--- sample {o.index}")
            print(o.text)
    return total


def generate_command(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.file, args.prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop, n=args.n, ignore_eos=args.ignore_eos,
    )
    engine = Engine(model=args.model, progress=not args.no_progress, **engine_kwargs(args))
    use_chat = args.chat == "on" or (args.chat == "auto" and engine.tokenizer.has_chat_template)
    texts = [engine.apply_chat_template([{"role": "user", "content": p}]) if use_chat else p for p in prompts]
    t0 = time.perf_counter()
    if args.stream:
        total = _stream(engine, prompts, texts, params, args.json)
    else:
        outs = engine.generate(texts, params, use_tqdm=len(prompts) > 1 and not args.no_progress)
        total = _print_outputs(prompts, outs, args.json)
    if not args.json:
        dt = time.perf_counter() - t0
        print(f"[{total} tokens in {dt:.2f} s, {total / dt:.1f} tok/s on {engine.probe.name}, {engine.dtype}]",
              file=sys.stderr)
    return 0


# ------------------------------------------------------------------ quantize


def quantize_command(args: argparse.Namespace) -> int:
    """``llmcore quantize``: write the checkpoint and say how to serve it."""
    report = quantize_awq(args.model, args.calibration, args.output, group_size=args.group_size,
                          search=not args.no_search, max_tokens=args.max_calibration_tokens)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    out = sys.stdout
    print(f"wrote {args.output}: awq, 4-bit, group size {report.group_size}, "
          f"{report.calibration_tokens} calibration tokens, {report.seconds:.1f} s", file=out)
    if report.groups:
        gain = [1 - g.loss / g.rtn_loss for g in report.groups if g.rtn_loss > 0]
        print(f"scale search: {len(report.groups)} layer groups, output error "
              f"{100 * sum(gain) / len(gain):.0f}% lower than round-to-nearest on average", file=out)
    print(f"serve it with: llmcore generate --model {args.output} --quantization awq \"Hello\"", file=out)
    return 0
