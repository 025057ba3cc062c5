"""The ``llmcore serve`` options of the KServe v2 / Triton protocol (no torch: ``--help`` stays fast)."""

from __future__ import annotations

import argparse


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number in [0, 65535]")
    return int(text)


def add_serve_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KServe v2 / Triton protocol (HTTP routes under /v2 are always on)")
    g.add_argument("--grpc-port", type=_port, default=None, metavar="N",
                   help="also serve the KServe v2 / Triton gRPC protocol on this port (0 picks a free one and "
                        "prints it), on --host; same engines, API keys, queue limits and metrics")
    g.add_argument("--model-repository", default=None, metavar="DIR",
                   help="serve every model of a Triton-style repository DIR/<model>/<version>/ (settings in "
                        "DIR/<model>/config.yaml); models load and unload at run time through "
                        "/v2/repository/models/<m>/load|unload or 'llmcore repo load|unload'. See docs/triton.md")
