"""Which decode path the CPU device gives a runner, and the removed compile_decode option.

plugins/cpu/README.md is the table these tests pin: the native step by default (where it covers
the model and can be built), the torch forward with native_decode=False or enforce_eager, and
compile_decode accepted with a FutureWarning that names what replaces it.
"""

from __future__ import annotations

import pytest

from llmcore import Engine, SamplingParams
from llmcore_cpu import native
from llmcore_cpu.device import COMPILE_DECODE_REMOVED


def _engine(model, **kw):
    return Engine(model=str(model), device="cpu", dtype="float32", progress=False, num_kv_blocks=32,
                  block_size=16, **kw)


def _native_here() -> bool:
    try:
        return native.vector_kernels()
    except native.NativeUnavailable:
        return False


@pytest.mark.parametrize("options", [dict(native_decode=False), dict(enforce_eager=True)],
                         ids=["native_decode=False", "enforce_eager"])
def test_turning_the_native_step_off_leaves_the_torch_forward(tiny_llama, options):
    engine = _engine(tiny_llama, **options)
    assert engine.runner.decode_graph is None


def test_native_step_is_the_default_where_it_can_run(tiny_llama):
    if not _native_here():
        pytest.skip("no C++ compiler, or neither AVX-512 nor AVX2 here: the torch path is the default")
    assert isinstance(_engine(tiny_llama).runner.decode_graph, native.NativeDecode)


def test_compile_decode_warns_names_the_replacement_and_decodes_as_the_default(tiny_llama):
    with pytest.warns(FutureWarning) as record:
        engine = _engine(tiny_llama, compile_decode=True)
    msg = str(record[0].message)
    assert msg == COMPILE_DECODE_REMOVED
    assert "native decode step" in msg and "llmcore compile --device cpu" in msg
    default = _engine(tiny_llama)
    assert type(engine.runner.decode_graph) is type(default.runner.decode_graph)
    params = SamplingParams(max_tokens=6, temperature=0)
    prompt = [list(range(100, 110))]
    assert (engine.generate(prompt, params)[0].outputs[0].token_ids
            == default.generate(prompt, params)[0].outputs[0].token_ids)
