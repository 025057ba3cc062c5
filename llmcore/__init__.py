"""llmcore: one engine, continuous batching over a paged KV cache, on any accelerator.

Quick start::

    from llmcore import Engine, SamplingParams
    engine = Engine()   # embedded SmolLM2-135M-Instruct on the best device found
    print(engine.generate("What is the capital of France?", SamplingParams(max_tokens=32, temperature=0))[0].outputs[0].text)
"""

from llmcore.capabilities import Capabilities, DeviceProbe
from llmcore.errors import ConfigError, LlmcoreError, ModelLoadError, PluginError, RequestError
from llmcore.hookspecs import CONTRACT_VERSION, hookimpl
from llmcore.outputs import CompletionOutput, RequestOutput, StreamDelta
from llmcore.sampling_params import SamplingParams
from llmcore.version import __version__

__all__ = [
    "CONTRACT_VERSION", "Capabilities", "CompletionOutput", "ConfigError", "DeviceProbe", "Engine",
    "LlmcoreError", "ModelLoadError", "PluginError", "RequestError", "RequestOutput",
    "SamplingParams", "StreamDelta", "__version__", "hookimpl",
]


def __getattr__(name: str):
    # Engine pulls in torch; keep `import llmcore` (and plugin imports) light.
    if name == "Engine":
        from llmcore.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'llmcore' has no attribute {name!r}")
