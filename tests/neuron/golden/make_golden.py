"""Write the Neuron golden files with optimum-neuron's own NxDNeuronConfig (no compiler, no device).

    python -m venv /tmp/sdk-neuron && /tmp/sdk-neuron/bin/pip install torch "transformers~=4.57.1"
    /tmp/sdk-neuron/bin/pip install --no-deps optimum-neuron==0.4.5 optimum==2.0.0
    /tmp/sdk-neuron/bin/python tests/neuron/golden/make_golden.py

``NeuronModelForCausalLM.get_neuron_config`` for the NxD Llama/Qwen models builds an
``NxDNeuronConfig`` with ``on_device_sampling=True, fused_qkv=True, continuous_batching=batch_size > 1``
and the instance type mapped to its compile target (inf2 -> trn1); the cases below pass exactly those
arguments (llmcore's export may turn on_device_sampling off) and write it with the class's own
``save_pretrained``. The directory layout is what the model's ``save_pretrained`` adds next to it:
``config.json``, ``model.pt`` and one sharded checkpoint per rank (empty here).
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

SDK_VERSION = "0.4.5"
HERE = Path(__file__).resolve().parent
#: where to write (default: next to this script); CI writes elsewhere and compares
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
SHARD = "checkpoint/weights/tp{rank}_sharded_checkpoint.safetensors"

CASES = {
    # batch 4 x 4096 tokens over 2 NeuronCores, bf16, host sampling (llmcore's default export)
    "llama_b4_s4096_tp2": dict(batch_size=4, sequence_length=4096, tp_degree=2, torch_dtype="bfloat16",
                               on_device_sampling=False, heads=32),
    # what the hub cache holds: on-device sampling on, 24 cores for a 64-head model (heads padded to 72)
    "llama_b1_s4096_tp24_ods": dict(batch_size=1, sequence_length=4096, tp_degree=24, torch_dtype="bfloat16",
                                    on_device_sampling=True, heads=64),
}


def main() -> None:
    # neuronx-cc (Neuron's index only) is asked for its version when a config is saved; a stub answers
    stub = types.ModuleType("neuronxcc")
    stub.__version__ = "0.0.0+stub"
    sys.modules["neuronxcc"] = stub
    from optimum.neuron.models.inference.backend.config import NxDNeuronConfig
    from optimum.neuron.version import __version__
    from transformers import LlamaConfig

    if __version__ != SDK_VERSION:
        raise SystemExit(f"optimum-neuron {__version__} found; the golden files are for {SDK_VERSION}")
    for name, case in CASES.items():
        case = dict(case)
        heads = case.pop("heads")
        nc = NxDNeuronConfig(checkpoint_id=None, checkpoint_revision=None, target="trn1", fused_qkv=True,
                             continuous_batching=case["batch_size"] > 1, **case)
        out = OUT / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        nc.save_pretrained(out)
        hf = LlamaConfig(hidden_size=64 * heads // 4, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=8, vocab_size=256,
                         max_position_embeddings=8192, torch_dtype=case["torch_dtype"])
        hf.architectures = ["LlamaForCausalLM"]
        hf.save_pretrained(out)
        (out / "model.pt").write_bytes(b"")
        for rank in range(case["tp_degree"]):
            shard = out / SHARD.format(rank=rank)
            shard.parent.mkdir(parents=True, exist_ok=True)
            shard.write_bytes(b"")
        print(f"wrote {out}: {json.loads((out / 'neuron_config.json').read_text())}")


if __name__ == "__main__":
    main()
