"""``llmcore quantize``: write a pre-quantized checkpoint from a local model and calibration text."""

from __future__ import annotations

import argparse
import json
import sys

METHODS = ("awq",)


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
    )
    p.add_argument("--method", required=True, choices=METHODS, help="checkpoint format to write")
    p.add_argument("--model", "-m", default=None,
                   help="local Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--calibration", required=True, metavar="FILE",
                   help="UTF-8 text like the model's real inputs (a few KB or more)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="new or empty folder to write")
    p.add_argument("--group-size", type=int, default=None,
                   help="input channels per scale (default: 128, or 64/32 where 128 does not divide "
                        "a layer's width)")
    p.add_argument("--no-search", action="store_true",
                   help="skip the activation-aware scale search (plain round-to-nearest)")
    p.add_argument("--max-calibration-tokens", type=int, default=1024, help="tokens of calibration text used")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmcore.quantization.awq_calibrate import quantize_awq

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
