"""``llmcore serve`` and ``llmcore batch``: their command-line options (argparse sub-commands).

The main CLI wires them in with::

    from llmcore.server.cli import add_batch_parser, add_serve_parser
    add_serve_parser(subparsers)
    add_batch_parser(subparsers)
    ...
    return args.func(args)

``python -m llmcore.server serve|batch ...`` runs them without the main CLI. The commands
themselves are in :mod:`llmcore.server.commands`, imported when one runs (they load torch and
FastAPI); the engine options are the ones every verb shares (:mod:`llmcore.cli.options`).
"""

from __future__ import annotations

import argparse
from typing import Any

from llmcore.cli.options import (
    add_engine_options,
    add_engine_seed,
    lazy_command,
    nonneg_int,
    positive_int,
    seconds,
    setup_logging,
)
from llmcore.kserve.options import add_serve_options
from llmcore.server.tool_parsers import PARSERS

SERVE_EPILOG = """\
examples:
  llmcore serve                                  # embedded SmolLM2-135M-Instruct on the best device
  llmcore serve --model ./Qwen2.5-0.5B-Instruct --device cpu --port 8080
  llmcore serve --model ./a --model ./b --served-model-name a --served-model-name b
  llmcore serve --config models.yaml --api-key $KEY
  llmcore serve --ray --replicas 2 --device cpu --ray-num-cpus-per-replica 1   # 2 replicas on Ray Serve
  llmcore serve --ray --autoscale-min-replicas 1 --autoscale-max-replicas 4 --ray-address auto
  llmcore serve --model-repository ./models --grpc-port 8001   # Triton/KServe v2 clients too (docs/triton.md)

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'

config file (YAML):
  host: 127.0.0.1
  port: 8000
  api_keys: ["${LLMCORE_API_KEY}"]
  max_queue: 256
  request_timeout: 600
  default_max_tokens: 512   # a chat request without max_tokens generates at most this many
  max_body_bytes: 2097152   # larger request bodies get 413
  models:
    - {name: smol, model: null, device: cpu, max_num_seqs: 32}
    - {name: qwen, model: /models/Qwen2.5-7B-Instruct, device: cuda, dtype: bfloat16, max_queue: 64,
       tool_call_parser: hermes}
  ray:                      # optional: replicas on Ray Serve, as with --ray
    num_gpus_per_replica: 1
    autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}

Options given on the command line override the file's top-level settings;
--model entries are served in addition to the file's models.
Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
/health, /metrics, /docs (OpenAPI at /openapi.json), and a chat page at /.
"""

BATCH_EPILOG = """\
examples:
  llmcore batch requests.jsonl results.jsonl
  llmcore batch requests.jsonl results.jsonl --model ./Qwen2.5-0.5B-Instruct --device cpu --max-num-seqs 32
  llmcore batch requests.jsonl results.jsonl     # again after an interruption: resumes

input lines (OpenAI batch format):
  {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}
  url may be /v1/chat/completions, /v1/completions or /v1/embeddings.

output lines:
  {"id": "batch_req_...", "custom_id": "q1",
   "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

Bad lines are reported on stderr with their line number and written as error
lines; the job goes on. Rerun the same command to resume an interrupted job:
custom_ids already in OUTPUT are skipped.
exit status: 0 all lines succeeded, 1 some lines failed, 2 bad usage, 130 interrupted.
"""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to an argparse sub-parser set; ``args.func(args)`` runs it and returns the exit code."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (streaming, several models, API keys, /metrics)",
        description="Serve models over an OpenAI-compatible HTTP API (FastAPI + uvicorn). Requests join "
                    "the engine's continuous batch; past --max-queue waiting requests the server answers "
                    "503 with Retry-After; a client that disconnects aborts its request.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML file listing models and server settings (see below)")
    add_engine_options(p, several_models=True, served_name=True)
    add_engine_seed(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=nonneg_int, default=None,
                   help="port (default 8000; 0 picks a free one and prints it)")
    s.add_argument("--api-key", action="append", default=None, metavar="K",
                   help="accepted Bearer key; repeat for several. Every route but /health and the chat page "
                        "then needs 'Authorization: Bearer K'. Default: $LLMCORE_API_KEY "
                        "(comma-separated), else no authentication")
    s.add_argument("--max-queue", type=nonneg_int, default=None, metavar="N",
                   help="requests that may wait beyond --max-num-seqs per model before new ones get 503 "
                        "with Retry-After (default 256)")
    s.add_argument("--request-timeout", type=seconds, default=None, metavar="S",
                   help="seconds a request may take before it is aborted (504, or an error event when "
                        "streaming); 'none' disables (default 600)")
    s.add_argument("--default-max-tokens", type=positive_int, default=None, metavar="N",
                   help="tokens a chat request generates when it sets neither max_tokens nor "
                        "max_completion_tokens (default 512; never more than the context has left)")
    s.add_argument("--max-body-bytes", type=positive_int, default=None, metavar="N",
                   help="request bodies larger than this get 413 before being read (default 2097152 = 2 MiB)")
    s.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="how replies with tools are parsed into tool_calls (default: from the model's chat "
                        "template: hermes for <tool_call> (Qwen, Hermes, and templates without tools), "
                        "llama3_json, mistral)")
    s.add_argument("--log-level", dest="serve_log_level", default=None,
                   choices=["debug", "info", "warning", "error"],
                   help="log level of the server (default info)")
    s.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="do not log one line per HTTP request")
    r = p.add_argument_group("replicas on Ray Serve (needs: pip install 'llmcore[ray]')")
    r.add_argument("--ray", action="store_true", default=False,
                   help="serve on Ray Serve: each replica builds its own engines (same model and engine options) "
                        "behind Ray Serve's HTTP proxy on --host/--port")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="a fixed number of replicas (default 1); or use the --autoscale-* options")
    r.add_argument("--autoscale-min-replicas", dest="min_replicas", type=int, default=None, metavar="N",
                   help="autoscaling: fewest replicas (default 1; 0 stops them all when idle)")
    r.add_argument("--autoscale-max-replicas", dest="max_replicas", type=int, default=None, metavar="N",
                   help="autoscaling: most replicas (required for autoscaling)")
    r.add_argument("--target-ongoing-requests", dest="target_ongoing_requests", type=float, default=None,
                   metavar="N", help="autoscaling: requests in flight per replica that Ray Serve aims at "
                                     "(default 16)")
    r.add_argument("--ray-num-cpus-per-replica", dest="num_cpus_per_replica", type=float, default=None,
                   metavar="N", help="CPUs Ray reserves for each replica (default 1); the replica's engine runs "
                                     "that many torch threads unless --threads says otherwise")
    r.add_argument("--ray-num-gpus-per-replica", dest="num_gpus_per_replica", type=float, default=None,
                   metavar="N", help="GPUs per replica (default 0); Ray gives each replica its own "
                                     "(CUDA_VISIBLE_DEVICES)")
    r.add_argument("--ray-address", dest="address", default=None, metavar="ADDR",
                   help="join this Ray cluster (auto, ray://head:10001, head:6379); default: $RAY_ADDRESS, "
                        "else start a local Ray instance that stops with the server")
    r.add_argument("--ray-max-ongoing-requests", dest="max_ongoing_requests", type=int, default=None,
                   metavar="N", help="requests Ray Serve sends to one replica at once (default: the models' "
                                     "max_num_seqs + max_queue, so the replica's own 503 applies)")
    add_serve_options(p)  # --grpc-port, --model-repository (KServe v2 / Triton)
    p.set_defaults(func=lazy_command("llmcore.server.commands:serve_command", extra="serve"))
    return p


def add_batch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``batch`` to an argparse sub-parser set; ``args.func(args)`` runs it and returns the exit code."""
    p = subparsers.add_parser(
        "batch",
        help="run an OpenAI batch file (JSONL) offline through one engine; resumable",
        description="Run every request of INPUT (OpenAI batch-file format, one JSON request per line) "
                    "through one engine with continuous batching and append the results to OUTPUT.",
        epilog=BATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT.jsonl", help="requests, one JSON object per line")
    p.add_argument("output", metavar="OUTPUT.jsonl", help="results are appended here (created if absent)")
    add_engine_options(p, served_name=True)
    add_engine_seed(p)
    p.add_argument("--max-in-flight", type=positive_int, default=None, metavar="N",
                   help="requests queued in the engine at once (default 4 x max-num-seqs)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=lazy_command("llmcore.server.commands:batch_command", extra="serve"))
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m llmcore.server serve|batch ...``"""
    parser = argparse.ArgumentParser(prog="python -m llmcore.server")
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="log line format")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_batch_parser(sub)
    args = parser.parse_args(argv)
    setup_logging(None, args.log_format)
    return args.func(args)
