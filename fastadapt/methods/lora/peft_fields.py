"""Every field of PEFT's ``LoraConfig`` and what loading an adapter does with it: read it, ignore it
(it changes nothing the saved weights compute), or refuse a value other than PEFT's default with an
error naming the field and why. ``tests/methods/test_peft_lora_fields.py`` enumerates PEFT's
dataclass at test time and fails on a field that is not classified here. docs/interop.md is the
reader's version of these tables.
"""

from __future__ import annotations

import math
from typing import Any

from packaging.version import InvalidVersion, Version

from ... import _checks

#: Read into the ``fa.patch(model, "lora", ...)`` options (see :func:`read_options`); ``use_dora``
#: picks the method (``"dora"``: methods/lora/model.py's ``read_config``); ``peft_version`` decides
#: how OLoRA's initial factors of a Conv1D layer are computed (:func:`olora_layout`).
READ = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
        "init_lora_weights", "use_dora", "peft_version")

#: Fields that change nothing the loaded weights compute: field -> why.
IGNORED: dict[str, str] = {
    "auto_mapping": "which transformers class PEFT wraps",
    "base_model_name_or_path": "a note of the base model; fastadapt loads into the model it is given",
    "revision": "a note of the base model's revision",
    "inference_mode": "whether PEFT trains the adapter after loading",
    "fan_in_fan_out": "PEFT sets it from the layer type (transformers Conv1D or nn.Linear), as fastadapt does",
    "megatron_core": "read only with megatron_config (refused)",
    "loftq_config": "read only by init_lora_weights='loftq' (refused)",
    "eva_config": "EVA's data-driven initialisation of A; the trained A and B are in the file",
    "corda_config": "read only by init_lora_weights='corda' (refused)",
    "astra_config": "read only by init_lora_weights='astra' (refused)",
    "lora_ga_config": "read only by init_lora_weights='lora_ga' (refused)",
    "qalora_group_size": "read only with use_qalora (refused)",
    "runtime_config": "PEFT's runtime options (offloading)",
    "ensure_weight_tying": "ties the adapters of tied layers; fastadapt refuses tied targets",
}

#: Fields whose other values change what the weights compute: field -> (PEFT's default, why).
REFUSED: dict[str, tuple[Any, str]] = {
    "exclude_modules": (None, "it removes modules from the targets by a rule fastadapt does not read; "
                              "list the targets in target_modules instead"),
    "layers_to_transform": (None, "it restricts the targets to some layer indices by a rule fastadapt does "
                                  "not read; list the targets in target_modules instead"),
    "layers_pattern": (None, "it goes with layers_to_transform, which fastadapt does not read"),
    "bias": ("none", "it trains the base layers' biases, which fastadapt does not hold"),
    "modules_to_save": (None, "it trains full copies of whole modules (e.g. a classifier head)"),
    "rank_pattern": ({}, "it gives some modules another rank; fastadapt has one r per adapter"),
    "alpha_pattern": ({}, "it gives some modules another alpha; fastadapt has one alpha per adapter"),
    "megatron_config": (None, "it adapts Megatron tensor-parallel layers"),
    "trainable_token_indices": (None, "it also trains some rows of the token embeddings"),
    "velora_config": (None, "VeLoRA is another LoRA variant (a compressed backward with its own state)"),
    "alora_invocation_tokens": (None, "activated LoRA applies the adapter only from the invocation tokens on"),
    "use_qalora": (False, "QA-LoRA pools the input group-wise before A"),
    "monteclora_config": (None, "MonteCLoRA samples the adapter (a LoRA variant with its own tensors)"),
    "layer_replication": (None, "it duplicates decoder layers of the base model"),
    "lora_bias": (False, "it trains a bias of lora_B"),
    "target_parameters": (None, "it adapts parameters (e.g. mixture-of-experts weights), not linear layers"),
    "use_bdlora": (None, "BD-LoRA makes A or B block-diagonal (a LoRA variant)"),
    "arrow_config": (None, "Arrow routes between several LoRA experts"),
    "kasa_config": (None, "KaSA truncates the base weight's singular values and learns a diagonal between A and B"),
}

#: ``task_type`` values a causal-LM adapter has.
CAUSAL_TASK_TYPES = (None, "CAUSAL_LM")

#: ``init_lora_weights`` values whose files hold the whole adapter: the base weight is untouched.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica", "nora")
#: Inits that subtract ``scaling·B0·A0`` from the base weight, which PEFT recomputes from the base
#: weight at load (deterministically): loaded exactly as the rank-2r LoRA ``[A; A0]``, ``[B, -B0]``
#: that PEFT's own conversion (``path_initial_model_for_weight_conversion``) writes.
RESIDUAL_INITS = ("pissa", "olora")
#: Inits that cannot be reproduced: value (``pissa_niter_`` is a prefix) -> why.
REFUSED_INITS: dict[str, str] = {
    "pissa_niter_": "the randomized SVD PEFT recomputes at load subtracts a different residual on every load",
    "corda": "the residual subtracted from the base weight came from calibration data that is not in the folder",
    "astra": "the residual subtracted from the base weight came from calibration data (output-activation "
             "eigenvectors) that is not in the folder",
    "lora_ga": "the residual subtracted from the base weight came from gradients that are not in the folder",
    "loftq": "the base weight was replaced by its quantized residual, which is not in the folder",
}
CONVERT_HINT = (
    "convert it with PEFT into a plain LoRA: save_pretrained(..., path_initial_model_for_weight_conversion=...) "
    "right after get_peft_model, or merge it into the base model"
)


def _unset(value: Any, default: Any) -> bool:
    """The field has PEFT's default (or is absent/empty). ``0`` is a value, not "unset"."""
    if value is None or (isinstance(value, (dict, list, tuple)) and not value):
        return True
    return type(value) is type(default) and value == default


def init_kind(config: dict[str, Any], where: str) -> str:
    """``"plain"`` or ``"residual"`` for the saved ``init_lora_weights``; an error naming the value
    when it cannot be loaded exactly."""
    init = config.get("init_lora_weights", True)
    if init is None or any(init is v or (isinstance(init, str) and init == v) for v in PLAIN_INITS):
        return "plain"
    if isinstance(init, str) and init in RESIDUAL_INITS:
        return "residual"
    for value, why in REFUSED_INITS.items():
        if isinstance(init, str) and (init == value or (value.endswith("_") and init.startswith(value))):
            raise ValueError(f"{where} sets init_lora_weights={init!r}, which fastadapt cannot load exactly: "
                             f"{why}; {CONVERT_HINT}")
    raise ValueError(
        f"{where} sets init_lora_weights={init!r}; fastadapt knows {list(PLAIN_INITS) + list(RESIDUAL_INITS)} "
        f"and refuses {list(REFUSED_INITS)}"
    )


def check_fields(config: dict[str, Any], where: str) -> None:
    """Refuse, by name, every field whose value fastadapt cannot honour (fields this version does not
    know are refused unless empty: they may come from a newer PEFT)."""
    for key, (default, why) in REFUSED.items():
        value = config.get(key)
        if not _unset(value, default):
            raise ValueError(
                f"{where} sets {key}={value!r}, which fastadapt does not support: {why} (loads only {key}={default!r})"
            )
    task = config.get("task_type")
    if task not in CAUSAL_TASK_TYPES:
        raise ValueError(f"{where} sets task_type={task!r}; fastadapt loads causal-LM adapters "
                         f"(task_type {list(CAUSAL_TASK_TYPES)})")
    known = set(READ) | set(IGNORED) | set(REFUSED)
    for key, value in config.items():
        if key not in known and not _unset(value, False):
            raise ValueError(
                f"{where} sets {key}={value!r}, a field this version of fastadapt does not know (a newer PEFT's "
                "LoRA option?): refused rather than loaded without it"
            )


def read_options(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``fa.patch(model, "lora", ...)`` options of a PEFT LoRA config (checked by name). A
    residual init (PiSSA, OLoRA) gives rank 2r with the same scaling, as PEFT's conversion does."""
    check_fields(config, where)
    kind = init_kind(config, where)
    r, alpha = file_rank_and_alpha(config, where)
    dropout = config.get("lora_dropout", 0.0)
    try:
        dropout = _checks.probability("lora_dropout", dropout)
        rslora = _checks.boolean("use_rslora", config.get("use_rslora", False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    targets = config.get("target_modules")
    if targets is None:
        raise ValueError(f"{where} has no target_modules")
    if kind == "residual":
        r, alpha = 2 * r, alpha * (math.sqrt(2) if rslora else 2)
    return {"r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora, "targets": targets}


def file_rank_and_alpha(config: dict[str, Any], where: str) -> tuple[int, float]:
    """``r`` and ``lora_alpha`` as saved (PEFT's default alpha is 8)."""
    try:
        r = _checks.positive_int("r", config.get("r"))
        alpha = config.get("lora_alpha", 8)
        _checks.finite_number("lora_alpha", alpha)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return r, alpha


#: PEFT 0.22 began computing OLoRA's initial factors of a ``fan_in_fan_out`` (GPT-2 Conv1D) weight in
#: nn.Linear's layout (the QR of Wᵀ as stored); PEFT 0.21 and earlier took the QR of the weight as
#: stored. Versions in between (0.21.1.devN, 0.22.0 pre-releases) may hold either.
OLORA_LINEAR_LAYOUT_SINCE = Version("0.22.0")
OLORA_STORED_LAYOUT_UNTIL = Version("0.21.1.dev0")


def olora_layout(config: dict[str, Any]) -> str | None:
    """How the PEFT that wrote ``config`` factorises a Conv1D weight for OLoRA: ``"linear"`` (the
    (out, in) weight, PEFT >= 0.22), ``"stored"`` (the (in, out) weight as stored, PEFT <= 0.21), or
    None when ``peft_version`` is absent (PEFT < 0.18 or another writer), unparsable or between the two."""
    raw = config.get("peft_version")
    if not isinstance(raw, str):
        return None
    try:
        version = Version(raw.split("@")[0])
    except InvalidVersion:
        return None
    if version >= OLORA_LINEAR_LAYOUT_SINCE:
        return "linear"
    if version < OLORA_STORED_LAYOUT_UNTIL:
        return "stored"
    return None
