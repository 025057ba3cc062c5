"""Test helpers for llmcore and for plugin authors (random models, conformance suite)."""
