"""``llmcore quantize``: write a pre-quantized checkpoint from a local model and calibration text."""

from __future__ import annotations

import argparse

from llmcore.cli.options import lazy_command, positive_int

METHODS = ("awq",)

EXAMPLES = """\
examples:
  llmcore quantize --method awq --model ./Qwen2.5-0.5B-Instruct --calibration notes.txt -o ./qwen-awq
  llmcore quantize --method awq --calibration notes.txt -o ./smol-awq --no-search --json
  llmcore generate --model ./qwen-awq --quantization awq "Hello"     # serve the result
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an AWQ (4-bit) checkpoint from a local model and calibration text",
        description=(
            "Quantize a local model ahead of time into AutoAWQ's GEMM checkpoint layout (4-bit "
            "weights, group-wise scales and zero points), then serve it with --quantization awq. "
            "The activation-aware scale search runs on your calibration text (nothing is "
            "downloaded); --no-search writes plain round-to-nearest groups in the same layout. "
            "Methods that quantize at load (eetq, int4, bnb-int8, bnb-nf4) need no step like this."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=METHODS, help="checkpoint format to write")
    p.add_argument("--model", "-m", default=None,
                   help="local Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--calibration", required=True, metavar="FILE",
                   help="UTF-8 text like the model's real inputs (a few KB or more)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="new or empty folder to write")
    p.add_argument("--group-size", type=positive_int, default=None,
                   help="input channels per scale (default: 128, or 64/32 where 128 does not divide "
                        "a layer's width)")
    p.add_argument("--no-search", action="store_true",
                   help="skip the activation-aware scale search (plain round-to-nearest)")
    p.add_argument("--max-calibration-tokens", type=positive_int, default=1024, help="tokens of calibration text used")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=lazy_command("llmcore.cli.commands:quantize_command"))
