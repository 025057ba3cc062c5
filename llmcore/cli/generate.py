"""``llmcore generate``: prompts in, text out."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_parser(sub) -> None:
    from llmcore.cli.main import add_engine_options

    p = sub.add_parser(
        "generate",
        help="generate text for one prompt or a file of prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Generate with continuous batching: all prompts of --file run together.\n\n"
            "Chat models (those whose tokenizer has a chat template, like the default SmolLM2-Instruct)\n"
            "get each prompt wrapped as a user message unless --no-chat is given.\n"
            "Decoding is greedy (--temperature 0) unless you set a temperature.\n\n"
            "examples:\n"
            '  llmcore generate "What is the capital of France?"\n'
            '  llmcore generate --stream --max-tokens 200 "Write a haiku about the sea"\n'
            "  llmcore generate -f prompts.txt --json > out.jsonl\n"
            '  llmcore generate --no-chat --dtype float32 "The capital of France is"'
        ),
    )
    p.add_argument("prompt", nargs="?", help="the prompt (or use --file)")
    p.add_argument("--file", "-f", help="file with one prompt per line ('-' for stdin)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_const", const="on",
                      help="apply the model's chat template (default when it has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_const", const="off",
                      help="send prompts as raw text")
    p.set_defaults(chat="auto")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_options(p)
    p.set_defaults(func=run)


def _read_prompts(args) -> list[str]:
    from llmcore.errors import ConfigError

    if args.file:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with stream:
            prompts = [line.rstrip("\n") for line in stream if line.strip()]
        if not prompts:
            raise ConfigError("--file", args.file, "contains no prompts", "Put one prompt per line")
        return prompts
    if args.prompt is None:
        raise ConfigError("prompt", None, "is missing", 'Pass a prompt ("Hello") or --file prompts.txt')
    return [args.prompt]


def run(args: argparse.Namespace) -> int:
    from llmcore.cli.main import engine_kwargs
    from llmcore.engine.engine import Engine
    from llmcore.sampling_params import SamplingParams

    prompts = _read_prompts(args)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop, n=args.n, ignore_eos=args.ignore_eos,
    )
    engine = Engine(progress=not args.no_progress, **engine_kwargs(args))
    use_chat = args.chat == "on" or (args.chat == "auto" and engine.tokenizer.has_chat_template)
    texts = [engine.apply_chat_template([{"role": "user", "content": p}]) if use_chat else p for p in prompts]
    t0 = time.perf_counter()
    if args.stream:
        total = 0
        for prompt, text in zip(prompts, texts):
            if len(prompts) > 1:
                print(f"### {prompt}")
            for delta in engine.stream(text, params):
                total += len(delta.token_ids)
                print(delta.text, end="", flush=True)
            print()
        _summary(total, t0, engine, args)
        return 0
    outs = engine.generate(texts, params, use_tqdm=len(prompts) > 1 and not args.no_progress)
    total = 0
    for prompt, out in zip(prompts, outs):
        total += sum(len(o.token_ids) for o in out.outputs)
        if args.json:
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
    _summary(total, t0, engine, args)
    return 0


def _summary(tokens: int, t0: float, engine, args) -> None:
    if args.json:
        return
    dt = time.perf_counter() - t0
    print(f"[{tokens} tokens in {dt:.2f} s, {tokens / dt:.1f} tok/s on {engine.probe.name}, {engine.dtype}]",
          file=sys.stderr)
