"""Moved to :mod:`llmcore.compiled.serve`; this name stays for the engine's import of it."""

from llmcore.compiled.serve import StaticServing, explicit_settings, prepare_static

__all__ = ["StaticServing", "explicit_settings", "prepare_static"]
