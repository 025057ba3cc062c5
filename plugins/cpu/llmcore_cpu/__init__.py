"""llmcore's CPU device: torch eager over a paged KV cache. Always available."""

__version__ = "0.1.0"
