"""Write the RBLN golden files with optimum-rbln's own configuration classes (no compiler, no card).

    pip install --no-deps --target /tmp/sdk-rbln optimum-rbln==0.12.0
    PYTHONPATH=/tmp/sdk-rbln python tests/rbln/golden/make_golden.py

optimum-rbln imports the RBLN compiler (``rebel``, only on Rebellions' index); a stub module
stands in for it, which is enough because only configuration code runs here: the
``RBLN<Arch>ForCausalLMConfig`` class, the model class's ``_update_rbln_config`` (what
``from_pretrained(export=True)`` resolves before it compiles), ``freeze`` and ``save``. The
compiled-directory layout is what ``save_pretrained`` writes next to ``rbln_config.json``:
``config.json`` and one ``<compiled_model_name>.rbln`` per compile config (empty here).
Run it with the transformers optimum-rbln pins (5.x); the output is committed, the tests read it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path

SDK_VERSION = "0.12.0"
HERE = Path(__file__).resolve().parent
#: where to write (default: next to this script); CI writes elsewhere and compares
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE


class _StubModule(types.ModuleType):
    """Any attribute is a placeholder class: configuration code only names them."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "rebel" or fullname.startswith("rebel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+stub"
        return module

    def exec_module(self, module):
        pass


def _hf_config(arch: str, **extra):
    from transformers import LlamaConfig, MistralConfig

    cls = {"LlamaForCausalLM": LlamaConfig, "MistralForCausalLM": MistralConfig}[arch]
    cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=8192, **extra)
    cfg.architectures = [arch]
    return cfg


def write_case(name: str, arch: str, rbln: dict, hf_extra: dict | None = None) -> None:
    import optimum.rbln as rbln_pkg

    config_cls = getattr(rbln_pkg, f"RBLN{arch}Config")
    model_cls = getattr(rbln_pkg, f"RBLN{arch}")
    hf = _hf_config(arch, **(hf_extra or {}))
    rbln_config = config_cls(**rbln)
    rbln_config = model_cls._update_rbln_config(model_config=hf, rbln_config=rbln_config)
    rbln_config.freeze()
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rbln_config.save(out)
    hf.save_pretrained(out)
    for cfg in json.loads((out / "rbln_config.json").read_text())["_compile_cfgs"]:
        (out / f"{cfg['compiled_model_name']}.rbln").write_bytes(b"")
    print(f"wrote {out}")


CASES = {
    # the case: batch 4, max_seq_len 4096, 4 devices, eager attention (block = max_seq_len)
    "llama_b4_s4096_tp4": ("LlamaForCausalLM", dict(
        batch_size=4, max_seq_len=4096, num_devices=4, npu="RBLN-CA25", attn_impl="eager",
        kvcache_block_size=4096, kvcache_num_blocks=4, decoder_batch_sizes=[4, 2, 1], dtype="float16")),
    # flash attention, two decode buckets
    "llama_b2_s8192_flash": ("LlamaForCausalLM", dict(
        batch_size=2, max_seq_len=8192, num_devices=1, npu="RBLN-CA25", attn_impl="flash_attn",
        kvcache_partition_len=4096, kvcache_block_size=4096, kvcache_num_blocks=4,
        decoder_batch_sizes=[2, 1], dtype="float16")),
    # a quantized checkpoint: the SDK compiles it in float32
    "llama_b1_s2048_w4a16": ("LlamaForCausalLM", dict(
        batch_size=1, max_seq_len=2048, num_devices=1, npu="RBLN-CA25", attn_impl="eager",
        kvcache_block_size=2048, kvcache_num_blocks=1, dtype="float32",
        quantization={"format": "rbln", "weights": "int4", "activations": "fp16", "kv_caches": "fp16"})),
}
# Mistral with sliding_window set and no use_sliding_window: the SDK picks cache_impl="sliding_window"
MISTRAL_SLIDING = ("MistralForCausalLM", dict(
    batch_size=1, max_seq_len=4096, num_devices=1, npu="RBLN-CA25", attn_impl="eager",
    kvcache_block_size=4096, kvcache_num_blocks=1, dtype="float16"), dict(sliding_window=4096))


def main() -> None:
    sys.meta_path.insert(0, _StubFinder())
    import optimum.rbln

    if optimum.rbln.__version__ != SDK_VERSION:
        sys.exit(f"optimum-rbln {optimum.rbln.__version__} found; the golden files are for {SDK_VERSION}")
    for name, (arch, rbln) in CASES.items():
        write_case(name, arch, rbln)
    arch, rbln, hf_extra = MISTRAL_SLIDING
    write_case("mistral_sliding_window", arch, rbln, hf_extra)


if __name__ == "__main__":
    main()
