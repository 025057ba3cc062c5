"""Next-token logits from Hugging Face transformers: the reference a device is checked against.

float32 on the CPU, no KV cache, the whole prefix recomputed every call: slow
on purpose, and independent of every llmcore code path.
"""

from __future__ import annotations

from pathlib import Path


class HFReference:
    def __init__(self, model) -> None:
        self.model = model.eval()
        self._memo: dict[tuple[int, ...], object] = {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "HFReference":
        import torch
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32))

    @classmethod
    def from_files(cls, config_dir: str | Path, weights: str | Path) -> "HFReference":
        """A config.json folder plus one safetensors file holding the Hugging Face state dict."""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(config_dir))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        tied = getattr(config, "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"{weights}: missing tensors {missing}, unexpected {unexpected}")
        if tied:
            model.tie_weights()
        return cls(model.float())

    def next_logits(self, tokens: list[int]):
        """float32 logits [vocab] for the token after ``tokens``."""
        import torch

        key = tuple(tokens)
        if key not in self._memo:
            if len(self._memo) > 512:
                self._memo.clear()
            with torch.inference_mode():
                out = self.model(torch.tensor([list(key)]), use_cache=False, logits_to_keep=1)
            self._memo[key] = out.logits[0, -1].float()
        return self._memo[key].clone()

    def greedy(self, tokens: list[int]) -> tuple[int, float]:
        """(argmax token, its log-probability) after ``tokens``."""
        import torch

        logprobs = torch.log_softmax(self.next_logits(tokens), dim=-1)
        token = int(logprobs.argmax())
        return token, float(logprobs[token])
