"""Plain-PyTorch twins of every fused op, with the same signatures.

They are the CPU backend, the oracle for kernel tests and a baseline in ``bench/``. They compute in
the activation dtype (fp32 adapter weights are cast down, never the activations up), which is
what "cuBLAS base + addmm of the LoRA term" costs on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ (+ bias) + scaling · (dropout(x) Aᵀ) Bᵀ``.

    x (..., K); weight (N, K); lora_a (r, K); lora_b (N, r); returns (..., N) in the compute dtype
    (x's dtype, or the autocast dtype). ``backend`` is accepted for signature parity and ignored.
    """
    del backend
    y = F.linear(x, weight, bias)
    compute_dtype = y.dtype
    h = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    s = F.linear(h, lora_a.to(compute_dtype)) * scaling
    y2d = y.reshape(-1, y.shape[-1])
    out = torch.addmm(y2d, s.reshape(-1, s.shape[-1]), lora_b.to(compute_dtype).t())
    return out.reshape(y.shape)
