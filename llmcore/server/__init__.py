"""OpenAI-compatible HTTP server (``llmcore serve``) and offline batch jobs (``llmcore batch``).

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client, pyyaml).
Importing this package (or ``llmcore.server.cli``) stays light: FastAPI and
torch load only when a command runs or ``create_app`` is used.

>>> from llmcore import Engine
>>> from llmcore.engine.async_engine import AsyncEngine
>>> from llmcore.server import create_app
>>> app = create_app({"smol": AsyncEngine(Engine())}, api_keys=["secret"])
"""

from llmcore.server.cli import add_batch_parser, add_serve_parser

__all__ = ["ServedModel", "add_batch_parser", "add_serve_parser", "create_app"]


def __getattr__(name: str):
    # the app needs FastAPI, an optional dependency (llmcore[serve]); the CLI parsers do not
    if name in ("create_app", "ServedModel"):
        from llmcore.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'llmcore.server' has no attribute {name!r}")
