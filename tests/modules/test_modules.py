"""The adapter modules validate their own arguments: a clear error naming the argument, never a
ZeroDivisionError or a shape error from deep inside."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastadapt.modules import BottleneckLinear, LoraLinear
from fastadapt.modules.prefix import PrefixEncoder


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 0, "alpha": 16}, ValueError, "r must be a positive int, got 0"),
        ({"r": 2.5, "alpha": 16}, TypeError, "r must be a positive int, got 2.5"),
        ({"r": True, "alpha": 16}, TypeError, "r must be a positive int"),
        ({"r": 4, "alpha": float("nan")}, ValueError, "alpha must be a finite number"),
        ({"r": 4, "alpha": 8, "dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        ({"r": 4, "alpha": 8, "rslora": "yes"}, TypeError, "rslora must be a bool"),
    ],
)
def test_lora_linear_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraLinear(nn.Linear(8, 6), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"position": "middle", "bottleneck": 4}, ValueError, "position must be one of"),
        ({"position": "output", "bottleneck": 0}, ValueError, "bottleneck must be a positive int, got 0"),
        ({"position": "output", "bottleneck": 4, "activation": "swish"}, ValueError, "activation must be one of"),
        ({"position": "output", "bottleneck": 4, "dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"position": "output", "bottleneck": 4, "scaling": "big"}, ValueError, "scaling must be a finite number or 'learned'"),
        ({"position": "output", "bottleneck": 4, "init": "xavier"}, ValueError, "init must be one of"),
    ],
)
def test_bottleneck_linear_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BottleneckLinear(nn.Linear(8, 6), **kwargs)


def test_prefix_encoder_bad_arguments():
    good = {"num_virtual_tokens": 2, "num_layers": 2, "num_kv_heads": 2, "head_dim": 4}
    for name in good:
        with pytest.raises(ValueError, match=f"{name} must be a positive int, got 0"):
            PrefixEncoder(**{**good, name: 0})
    with pytest.raises(ValueError, match="init_std must be a positive finite number"):
        PrefixEncoder(**good, init_std=0.0)
    with pytest.raises(ValueError, match="hidden_size is required with projection=True"):
        PrefixEncoder(**good, projection=True)


def test_unsupported_base_layer_is_named():
    with pytest.raises(TypeError, match=r"unsupported module type torch\.nn\.modules\.conv\.Conv2d"):
        LoraLinear(nn.Conv2d(3, 3, 1), r=2, alpha=4)


def test_valid_modules_keep_the_base_and_change_nothing_at_init():
    base = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    lora = LoraLinear(base, r=2, alpha=4)
    assert lora.base_layer is base and (lora.in_features, lora.out_features) == (8, 6)
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=0)
    zeros = BottleneckLinear(nn.Linear(8, 6), position="output", bottleneck=3, init="zeros")
    torch.testing.assert_close(zeros(x), zeros.base_layer(x), rtol=0, atol=0)
