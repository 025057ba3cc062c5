"""Errors a user can act on.

Every error raised for bad input says which option, which value, and what
would work. ``ConfigError`` carries those as fields so the CLI and the HTTP
server can render them (the server maps ``param`` into OpenAI's error object).
"""

from __future__ import annotations

from typing import Any


class LlmcoreError(Exception):
    """Base class for every error llmcore raises on purpose."""


class ConfigError(LlmcoreError, ValueError):
    """An option has a value that cannot work; the message says what would."""

    def __init__(self, option: str, value: Any, problem: str, hint: str = "") -> None:
        self.option = option
        self.value = value
        self.problem = problem
        self.hint = hint
        msg = f"{option}={value!r}: {problem}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class RequestError(ConfigError):
    """A single request cannot be served (the engine keeps running)."""


class PluginError(LlmcoreError):
    """A plugin is missing, refused, disabled or unusable."""


class DeviceUnavailableError(PluginError):
    """The requested device exists as a plugin but cannot run here."""


class ModelLoadError(LlmcoreError):
    """A model could not be found or read."""
