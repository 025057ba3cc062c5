"""bitsandbytes int8 (LLM.int8()) and NF4, quantized at load.

bitsandbytes quantizes when its parameter moves to the target device, so each
float ``nn.Linear`` is rebuilt as a bnb layer and moved there, one decoder layer
at a time while the checkpoint loads (``QuantHandler.streaming``). The output
projection stays in the model dtype, as in transformers' bnb integration.
bitsandbytes runs on the CPU (its CPU backend) and on CUDA.
"""

from __future__ import annotations

import logging

from torch import nn

from llmcore.quantization.handler import QuantHandler

log = logging.getLogger("llmcore.quantization")

INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (bitsandbytes' and transformers' default)
NF4_BLOCKSIZE = 64


def _bnb():
    # bitsandbytes logs a warning on import when an optional CPU kernel package is absent;
    # it falls back to its own kernel, so keep the user's console quiet.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


class BnbInt8Handler(QuantHandler):
    streaming = True  # one layer at a time while loading (QuantHandler)

    def quantize_linear(self, layer: nn.Linear) -> nn.Module:
        bnb = _bnb()
        threshold = float(self.options.get("threshold", INT8_THRESHOLD))
        device = layer.weight.device
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  has_fp16_weights=False, threshold=threshold, device="meta")
        new.weight = bnb.nn.Int8Params(layer.weight.data.to(self.torch_dtype), requires_grad=False,
                                       has_fp16_weights=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.data.to(self.torch_dtype), requires_grad=False)
        return new.to(device)

    def log_summary(self, model: nn.Module) -> None:
        log.info("bnb-int8: %d linear layers (threshold %.1f)", self.swapped,
                 float(self.options.get("threshold", INT8_THRESHOLD)))


class BnbNf4Handler(QuantHandler):
    streaming = True

    def quantize_linear(self, layer: nn.Linear) -> nn.Module:
        bnb = _bnb()
        blocksize = int(self.options.get("blocksize", NF4_BLOCKSIZE))
        device = layer.weight.device
        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                compute_dtype=self.torch_dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(layer.weight.data.to(self.torch_dtype), requires_grad=False,
                                       quant_type="nf4", blocksize=blocksize)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.data.to(self.torch_dtype), requires_grad=False)
        return new.to(device)

    def log_summary(self, model: nn.Module) -> None:
        log.info("bnb-nf4: %d linear layers (block size %d)", self.swapped,
                 int(self.options.get("blocksize", NF4_BLOCKSIZE)))


def load_int8(method, device: str, dtype: str, **options) -> BnbInt8Handler:
    return BnbInt8Handler(method, device, dtype, **options)


def load_nf4(method, device: str, dtype: str, **options) -> BnbNf4Handler:
    return BnbNf4Handler(method, device, dtype, **options)


