"""Weight quantization: a registry of methods, checked against each device before loading.

>>> from llmcore import quantization
>>> [m.name for m in quantization.methods_for_device("cpu")]
['bnb-int8', 'bnb-nf4', 'awq', 'eetq', 'int4']

Importing this package does not import torch; a method's kernels load when it
is used (:meth:`QuantMethod.load`). See docs/quantization.md.
"""

from llmcore.quantization.registry import (
    QuantMethod,
    available_names,
    builtin_methods,
    explain_refusal,
    get,
    matrix,
    methods,
    methods_for_device,
)

__all__ = [
    "QuantMethod", "available_names", "builtin_methods", "explain_refusal", "get", "matrix",
    "methods", "methods_for_device", "prepare",
]


def prepare(name: str, device: str, dtype: str, plugins=None, **options):
    """The handler that applies method ``name`` on a ``device`` kind computing in ``dtype``."""
    return get(name, plugins).load(device=device, dtype=dtype, **options)
