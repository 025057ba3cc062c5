"""Quantizing while loading (issue #8): the runner swaps each decoder layer as soon as its weights
are in, so a load never holds the whole float model. The result must be bit for bit what the
old path gave: build the float model, load every weight, then swap the layers of the whole model.

The reference below is that old path written out (with the one-pass int8 quantizer the chunked
one replaced), not the handlers' own ``apply``, so a change in either shows up here.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from llmcore.errors import ModelLoadError
from llmcore.models import registry
from llmcore.models.config import ModelConfig
from llmcore.models.loader import iter_safetensors
from llmcore.quantization import int8 as int8_mod
from llmcore.quantization import prepare
from llmcore.quantization.awq import int4_linear_from_float
from llmcore.quantization.handler import QuantHandler, linear_layers
from llmcore.quantization.int8 import Int8Linear, quantize_int8, quantize_output_int8
from llmcore.runtime.attention import AttentionMetadata, TorchPagedAttention
from llmcore.runtime.runner import TorchModelRunner

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
METHODS = ["eetq", "int4"] + (["bnb-int8", "bnb-nf4"] if HAVE_BNB else [])
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """Four layers (so 'one layer at a time' is visible), untied output projection."""
    from llmcore.testing.models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("deep") / "m", arch="llama", seed=5, num_hidden_layers=4)


# ------------------------------------------------------------------------------ the old path


def _one_pass_int8(weight):
    """quantize_int8 before it worked in row chunks."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _float_model(folder: Path, dtype: torch.dtype, weights=None) -> nn.Module:
    cfg = ModelConfig.from_path(folder)
    with torch.device("meta"):
        model = registry.get_architecture(cfg.architecture)(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.load_weights(iter_safetensors(folder) if weights is None else weights)
    return model


def _old_swap(method: str, model: nn.Module, dtype: torch.dtype, monkeypatch) -> None:
    """The whole-model module swap as the handlers did it before streaming."""
    with monkeypatch.context() as patched:
        patched.setattr(int8_mod, "quantize_int8", _one_pass_int8)
        if method == "eetq":
            for parent, name, layer in linear_layers(model):
                setattr(parent, name, Int8Linear.from_linear(layer, dtype))
            quantize_output_int8(model, dtype)
        elif method == "int4":
            for parent, name, layer in linear_layers(model):
                new = int4_linear_from_float(layer, 32, dtype)
                if new is not None:
                    setattr(parent, name, new)
            quantize_output_int8(model, dtype)
        else:
            import bitsandbytes as bnb

            for parent, name, layer in linear_layers(model):
                if method == "bnb-int8":
                    new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                              has_fp16_weights=False, threshold=6.0, device="meta")
                    new.weight = bnb.nn.Int8Params(layer.weight.data.to(dtype), requires_grad=False,
                                                   has_fp16_weights=False)
                else:
                    new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                            compute_dtype=dtype, quant_type="nf4", device="meta")
                    new.weight = bnb.nn.Params4bit(layer.weight.data.to(dtype), requires_grad=False,
                                                   quant_type="nf4", blocksize=64)
                if layer.bias is not None:
                    new.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
                setattr(parent, name, new.to(layer.weight.device))


# ------------------------------------------------------------------------------ comparing


def _runner(folder: Path, method: str | None, dtype: str, tp=None) -> TorchModelRunner:
    return TorchModelRunner(ModelConfig.from_path(folder), Path(folder), torch.device("cpu"), dtype,
                            TorchPagedAttention(), block_size=16, max_model_len=64, eos_token_ids=[2],
                            progress=False, quantization=method, tp=tp)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model holds: parameters, buffers, plain tensor attributes, bnb state."""
    out = {}
    for mname, m in model.named_modules():
        for n, p in m.named_parameters(recurse=False):
            out[f"{mname}.{n}"] = p
            state = getattr(p, "quant_state", None)
            for k, v in (vars(state).items() if state is not None else ()):
                if isinstance(v, torch.Tensor):
                    out[f"{mname}.{n}.quant_state.{k}"] = v
            if getattr(p, "SCB", None) is not None:
                out[f"{mname}.{n}.SCB"] = p.SCB
        for n, b in m.named_buffers(recurse=False):
            out[f"{mname}.{n}"] = b
        for n, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not n.startswith("rope_"):
                out[f"{mname}.@{n}"] = v
    return out


def _forward(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Logits of a 9-token prefill (fresh KV cache)."""
    cfg = model.config
    if model.rope_cos is None:  # built by hand: finish it as the runner does
        model.init_rope(64, torch.device("cpu"), dtype)
        model.backend = TorchPagedAttention()
        model.eval()  # bitsandbytes' int8 layers compute differently in training mode
    t = 9
    ids = torch.tensor([1, 504, 2923, 314, 7526, 28, 41, 90, 17])
    pos = torch.arange(t)
    meta = AttentionMetadata(slot_mapping=pos, query_starts=[0], query_lens=[t], context_lens=[t],
                             block_tables=[[0]])
    shape = (1, 16, cfg.num_kv_heads, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(cfg.num_layers)]
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, kv, meta))


def assert_same_model(got: nn.Module, want: nn.Module, dtype: torch.dtype) -> None:
    assert repr(got) == repr(want)  # the same modules in the same places, same kernels
    a, b = _state(got), _state(want)
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    # a tied embedding shares the int8 table with the output projection in both
    assert len({id(t) for t in a.values()}) == len({id(t) for t in b.values()})
    assert torch.equal(_forward(got, dtype), _forward(want, dtype))


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_fixture,dtype", [("tiny_llama", "bfloat16"), ("mha_qwen2", "bfloat16"),
                                                 ("mha_qwen2", "float32")])
def test_streaming_load_is_bit_identical_to_the_whole_model_swap(method, model_fixture, dtype, request,
                                                                 monkeypatch):
    folder = request.getfixturevalue(model_fixture)
    tdt = TORCH_DTYPES[dtype]
    got = _runner(folder, method, dtype).model
    want = _float_model(folder, tdt)
    _old_swap(method, want, tdt, monkeypatch)
    assert_same_model(got, want, tdt)
    # and the handler's own whole-model path (what a device that builds its own runner calls);
    # fresh models: a forward pass moves bitsandbytes' int8 state around
    whole, want = _float_model(folder, tdt), _float_model(folder, tdt)
    prepare(method, "cpu", dtype).apply(whole)
    _old_swap(method, want, tdt, monkeypatch)
    assert_same_model(whole, want, tdt)


def test_awq_streaming_load_equals_its_whole_model_apply(awq_tiny):
    got = _runner(awq_tiny, "awq", "bfloat16").model
    handler = prepare("awq", "cpu", "bfloat16")
    handler.check_checkpoint(awq_tiny)
    want = _float_model(awq_tiny, torch.bfloat16, handler.convert_weights(iter_safetensors(awq_tiny)))
    handler.apply(want)
    assert_same_model(got, want, torch.bfloat16)


def test_unquantized_load_is_unchanged(mha_qwen2):
    got = _runner(mha_qwen2, None, "bfloat16").model
    assert_same_model(got, _float_model(mha_qwen2, torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("method", ["eetq", "int4"])
def test_layers_are_quantized_one_at_a_time(deep_llama, method, monkeypatch):
    """When a layer is handed to the handler, the layers before it are quantized already and the
    ones after it not allocated yet: at most one decoder layer is ever float."""
    seen = []
    original = QuantHandler.quantize_loaded

    def spy(self, model, name, module):
        layers = model.model.layers
        float_layers = [i for i, layer in enumerate(layers)
                        if any(isinstance(m, nn.Linear) and not m.weight.is_meta for m in layer.modules())]
        seen.append((name, float_layers))
        return original(self, model, name, module)

    monkeypatch.setattr(QuantHandler, "quantize_loaded", spy)
    model = _runner(deep_llama, method, "bfloat16").model
    layer_calls = [(n, f) for n, f in seen if n.startswith("model.layers.")]
    assert [n for n, _ in layer_calls] == [f"model.layers.{i}" for i in range(4)]
    for name, float_layers in layer_calls:
        assert float_layers == [int(name.rsplit(".", 1)[1])], seen
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("method", ["eetq", "int4"])
def test_checkpoint_order_does_not_matter(deep_llama, method, monkeypatch):
    """Tensors of different layers interleaved (each layer completes late): same model."""
    import llmcore.runtime.runner as runner_mod

    want = _runner(deep_llama, method, "bfloat16").model
    tensors = list(iter_safetensors(deep_llama))
    random.Random(0).shuffle(tensors)
    monkeypatch.setattr(runner_mod, "iter_safetensors", lambda folder: iter(tensors))
    got = _runner(deep_llama, method, "bfloat16").model
    assert_same_model(got, want, torch.bfloat16)


@pytest.mark.parametrize("method", [None, "eetq"])
def test_tensor_parallel_shard_loads_quantized(tiny_qwen2, method, monkeypatch):
    """A rank's shard, streamed and quantized, equals quantizing that rank's loaded float shard."""
    from llmcore.parallel.tensor_parallel import TPGroup

    for rank in range(2):
        tp = TPGroup(rank, 2, reduce_fn=lambda t: None)
        got = _runner(tiny_qwen2, method, "float32", tp=tp).model
        cfg = tp.local_config(ModelConfig.from_path(tiny_qwen2))
        with torch.device("meta"):
            want = registry.get_architecture(cfg.architecture)(cfg)
        want = want.to_empty(device="cpu").to(torch.float32)
        want.load_weights(tp.shard_weights(iter_safetensors(tiny_qwen2)))
        if method is not None:
            _old_swap(method, want, torch.float32, monkeypatch)
        tp.finish(want)
        assert got.config == cfg
        assert repr(got) == repr(want)
        a, b = _state(got), _state(want)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("method", [None, "eetq", "int4"])
def test_missing_tensor_fails_with_the_same_error(tiny_llama, tmp_path, method):
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    for f in Path(tiny_llama).iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = {k: v.clone() for k, v in iter_safetensors(tiny_llama) if k != "model.layers.1.mlp.down_proj.weight"}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"^checkpoint is missing 1 tensors, e\.g\. "
                                             r"model\.layers\.1\.mlp\.down_proj\.weight$"):
        _runner(folder, method, "bfloat16")


def test_a_tensor_for_a_part_already_quantized_is_refused(tiny_llama, monkeypatch):
    import llmcore.runtime.runner as runner_mod

    tensors = list(iter_safetensors(tiny_llama))
    again = next(t for t in tensors if t[0] == "model.layers.0.self_attn.q_proj.weight")
    monkeypatch.setattr(runner_mod, "iter_safetensors", lambda folder: iter(tensors + [again]))
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' arrived after "
                                             r"the rest of model\.layers\.0 was loaded"):
        _runner(tiny_llama, "eetq", "bfloat16")


def test_a_handler_that_only_applies_to_a_whole_model_still_works(tiny_llama, monkeypatch):
    """A plugin's handler that overrides apply() only gets the fully loaded float model, as before."""
    import types

    import llmcore.quantization as quantization

    class WholeModel(QuantHandler):
        def apply(self, model):
            assert all(not p.is_meta for p in model.parameters())
            self.linears = len(linear_layers(model))
            for parent, name, layer in linear_layers(model):
                setattr(parent, name, Int8Linear.from_linear(layer, self.torch_dtype))

    made = []

    def fake_prepare(name, device, dtype, **kw):
        made.append(WholeModel(types.SimpleNamespace(name=name, dtypes=(dtype,)), device, dtype))
        return made[-1]

    monkeypatch.setattr(quantization, "prepare", fake_prepare)
    model = _runner(tiny_llama, "toy", "bfloat16").model
    assert made[0].linears == 4 * 2
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 8


def test_chunked_int8_quantizer_matches_one_pass():
    g = torch.Generator().manual_seed(0)
    for shape, dtype in [((5000, 577), torch.bfloat16), ((3, 2_000_001), torch.float32), ((7, 3), torch.float16),
                         ((0, 8), torch.float32)]:
        w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        if shape[0]:
            w[0] = 0  # an all-zero row: the scale's floor
        before = w.clone()
        q, s = quantize_int8(w)
        rq, rs = _one_pass_int8(w)
        assert torch.equal(q, rq) and torch.equal(s, rs), shape
        assert torch.equal(w, before)  # a float32 weight is not divided in place


def test_released_checkpoint_pages_still_read_the_same(tiny_llama):
    from llmcore.runtime.runner import _CheckpointPages

    pages = _CheckpointPages(Path(tiny_llama))
    it = iter_safetensors(tiny_llama)
    held = [(t, t.clone()) for _, t in zip(range(5), (t for _, t in it))]
    pages.release()
    assert all(torch.equal(t, copy) for t, copy in held)
    rest = [t.clone() for _, t in it]
    assert rest and all(torch.isfinite(t).all() for t in rest)
