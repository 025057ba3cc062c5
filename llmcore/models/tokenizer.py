"""Tokenizer, chat template and incremental detokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from llmcore.errors import ConfigError, ModelLoadError


class Tokenizer:
    def __init__(self, folder: Path, eos_token_ids: Sequence[int] = ()) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ModelLoadError(f"the tokenizer needs transformers: {exc}") from exc
        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:
            raise ModelLoadError(
                f"no usable tokenizer in {folder}: {exc}. A model folder needs the tokenizer files of "
                "its Hugging Face repository: tokenizer.json (or tokenizer.model / vocab.json + merges.txt) "
                "and tokenizer_config.json; copy them next to config.json"
            ) from exc
        eos = set(eos_token_ids)
        if self.hf.eos_token_id is not None:
            eos.add(self.hf.eos_token_id)
        gen = folder / "generation_config.json"
        if gen.is_file():
            g = json.loads(gen.read_text()).get("eos_token_id")
            eos |= {g} if isinstance(g, int) else set(g or [])
        self.eos_token_ids = sorted(eos)
        self.vocab_size = len(self.hf)
        self.all_special_ids = set(self.hf.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render ``messages`` (and ``tools``, OpenAI's function list, for templates that take them)."""
        if not self.has_chat_template:
            raise ConfigError(
                "messages", "...", "this model's tokenizer has no chat template",
                "Use generate() with a plain prompt instead",
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
                raise ConfigError(
                    f"messages[{i}]", m, "must be a dict with 'role' and 'content'",
                    'e.g. {"role": "user", "content": "Hello"}',
                )
        extra = {} if tools is None else {"tools": tools}
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **extra)

    def detokenize_incrementally(
        self, ids: Sequence[int], prefix_offset: int, read_offset: int, skip_special_tokens: bool
    ) -> tuple[str, int, int]:
        """New text for ``ids[read_offset:]``, holding back incomplete characters.

        Decoding a window (``prefix_offset`` .. end) and subtracting the text of
        ``prefix_offset`` .. ``read_offset`` keeps byte-level BPE merges and
        leading-space rules right; a trailing U+FFFD means a multi-byte
        character is still incomplete, so nothing is emitted yet.
        """
        prefix = self.decode(ids[prefix_offset:read_offset], skip_special_tokens)
        full = self.decode(ids[prefix_offset:], skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            return full[len(prefix) :], read_offset, len(ids)
        return "", prefix_offset, read_offset
