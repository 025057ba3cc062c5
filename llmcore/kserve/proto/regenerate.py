"""Regenerate ``grpc_service_pb2.py`` and ``grpc_service_pb2_grpc.py`` from ``grpc_service.proto``.

    python -m llmcore.kserve.proto.regenerate           # rewrite the shipped modules
    python -m llmcore.kserve.proto.regenerate --check   # exit 1 if they differ from a fresh build

Needs ``grpcio-tools`` (pinned in the ``test`` extra, so the output is the same everywhere).
Two edits follow the compiler's output, both so the modules can live inside the ``llmcore`` package:

- the messages go into a descriptor pool of their own, not protobuf's default pool, so a process
  that also imports Triton's client (which registers the same ``inference.*`` names from its own
  copy of the protocol) can load both;
- the service module imports the messages module by its package path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "grpc_service.proto"
OUTPUTS = ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py")
_POOL_DEFAULT = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_POOL_OWN = ("# llmcore: a pool of our own, so Triton's client (same message names) can be imported too\n"
             "_pool = _descriptor_pool.DescriptorPool()\n"
             "DESCRIPTOR = _pool.AddSerializedFile(")
_IMPORT_FLAT = "import grpc_service_pb2 as grpc__service__pb2"
_IMPORT_PKG = "from llmcore.kserve.proto import grpc_service_pb2 as grpc__service__pb2"


def _replace_once(text: str, old: str, new: str, where: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"{where}: expected one {old!r} in the compiler's output; grpcio-tools changed its "
                           "output format, update llmcore/kserve/proto/regenerate.py")
    return text.replace(old, new)


def generate() -> dict[str, str]:
    """Compile the proto in a temporary folder and return ``{file name: text}`` after the two edits."""
    from grpc_tools import protoc  # optional dependency: grpcio-tools

    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{HERE}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", PROTO]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {HERE / PROTO}")
        out = {name: (Path(tmp) / name).read_text() for name in OUTPUTS}
    out[OUTPUTS[0]] = _replace_once(out[OUTPUTS[0]], _POOL_DEFAULT, _POOL_OWN, OUTPUTS[0])
    out[OUTPUTS[1]] = _replace_once(out[OUTPUTS[1]], _IMPORT_FLAT, _IMPORT_PKG, OUTPUTS[1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmcore.kserve.proto.regenerate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the shipped modules, write nothing")
    args = parser.parse_args(argv)
    fresh = generate()
    stale = [name for name, text in fresh.items() if (HERE / name).read_text() != text]
    if args.check:
        for name in stale:
            print(f"{HERE / name} differs from a fresh build of {PROTO}", file=sys.stderr)
        return 1 if stale else 0
    for name, text in fresh.items():
        (HERE / name).write_text(text)
    print(f"wrote {', '.join(OUTPUTS)} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
