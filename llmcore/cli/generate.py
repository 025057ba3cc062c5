"""``llmcore generate``: prompts in, text out (the options; the command is :mod:`llmcore.cli.commands`)."""

from __future__ import annotations

import argparse

from llmcore.cli.options import add_engine_options, lazy_command, positive_int

DESCRIPTION = """\
Generate with continuous batching: all prompts of --file run together.

Chat models (those whose tokenizer has a chat template, like the default SmolLM2-Instruct)
get each prompt wrapped as a user message unless --no-chat is given.
Decoding is greedy (--temperature 0) unless you set a temperature.

With --n N each prompt gets N samples, printed one after the other under '--- sample i'
(with --stream the first is printed as it is generated, each next one from where it stands).
With --json the output is JSON lines: one object per prompt, or with --stream one per text
increment: {"prompt", "index" (the sample), "text", "token_ids", "finish_reason"}.

examples:
  llmcore generate "What is the capital of France?"
  llmcore generate --stream --max-tokens 200 "Write a haiku about the sea"
  llmcore generate -f prompts.txt --json > out.jsonl
  llmcore generate --n 2 --temperature 0.8 --seed 1 --stream "Name a colour"
  llmcore generate --stream --json "Hello" | jq -r .text
  llmcore generate --no-chat --dtype float32 "The capital of France is"
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text for one prompt or a file of prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
    )
    p.add_argument("prompt", nargs="?", help="the prompt (or use --file)")
    p.add_argument("--file", "-f", help="file with one prompt per line ('-' for stdin)")
    p.add_argument("--max-tokens", type=positive_int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--n", type=positive_int, default=1, help="samples per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_const", const="on",
                      help="apply the model's chat template (default when it has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_const", const="off",
                      help="send prompts as raw text")
    p.set_defaults(chat="auto")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true",
                   help="JSON lines on stdout: one object per prompt (with --stream: per text increment)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_options(p)
    p.set_defaults(func=lazy_command("llmcore.cli.commands:generate_command"))
