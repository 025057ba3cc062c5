"""The core's quantization methods (data only: loaders are imported when used)."""

from __future__ import annotations

from llmcore.capabilities import QuantMethod

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
BNB_HINT = "pip install bitsandbytes (or 'llmcore[quant]')"
TRITON_HINT = "pip install triton (or 'llmcore[cuda]')"

BUILTIN_METHODS: tuple[QuantMethod, ...] = (
    QuantMethod(
        name="bnb-int8", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, prequantized=False, bits=8,
        description="bitsandbytes LLM.int8(): int8 weights, int8 activations with fp outliers "
                    "(threshold 6.0); quantized at load; output projection kept",
        loader="llmcore.quantization.bnb:load_int8", requires=("bitsandbytes",), install_hint=BNB_HINT,
    ),
    QuantMethod(
        name="bnb-nf4", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, prequantized=False, bits=4,
        description="bitsandbytes 4-bit NormalFloat, block size 64, computes in the model dtype; "
                    "quantized at load; output projection kept",
        loader="llmcore.quantization.bnb:load_nf4", requires=("bitsandbytes",), install_hint=BNB_HINT,
    ),
    QuantMethod(
        name="awq", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, prequantized=True, bits=4,
        description="AutoAWQ-format checkpoints (GEMM layout, 4-bit, group-wise zero points); "
                    "make one with 'llmcore quantize --method awq'. CPU: int4 weight-only matmul "
                    "(torch int4pack), CUDA: Triton kernel",
        loader="llmcore.quantization.awq:load_awq", requires_on={"cuda": ("triton",)},
        checkpoint_format="awq", install_hint=TRITON_HINT,
    ),
    QuantMethod(
        name="eetq", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, prequantized=False, bits=8,
        description="int8 per-channel weight-only (W8A16), no calibration; every linear layer and "
                    "the output projection. CUDA: the eetq package's kernels if installed, else "
                    "Triton; CPU: torch int8 weight-only matmul",
        loader="llmcore.quantization.int8:load_eetq", requires_on={"cuda": ("triton",)},
        install_hint=TRITON_HINT,
    ),
    QuantMethod(
        name="int4", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, prequantized=False, bits=4,
        description="4-bit group-wise round-to-nearest at load (AWQ layout, no calibration), "
                    "output projection int8 per channel; same kernels as awq",
        loader="llmcore.quantization.awq:load_int4", requires_on={"cuda": ("triton",)},
        install_hint=TRITON_HINT,
    ),
)
