"""``PrefixEncoder``: the trainable per-layer key/value prefixes of prefix tuning (Li & Liang, 2021)."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks


def check_init_std(init_std: float) -> float:
    if _checks.finite_number("init_std", init_std) <= 0:
        raise ValueError(f"init_std must be a positive finite number, got {init_std!r}")
    return float(init_std)


class PrefixEncoder(nn.Module):
    """The prefix table ``(P, L·2·H_kv·D)`` (fp32), directly or through PEFT's projection MLP.

    :meth:`layer_kv` returns layer ``l``'s keys and values, each ``(H_kv, P, D)``; with a projection
    only that layer's rows of the output layer are computed."""

    def __init__(
        self,
        *,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        projection: bool = False,
        hidden_size: int | None = None,
        encoder_hidden_size: int | None = None,
        init_std: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_virtual_tokens", num_virtual_tokens), ("num_layers", num_layers),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            _checks.positive_int(name, value)
        _checks.boolean("projection", projection)
        init_std = check_init_std(init_std)
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.projection = projection
        self.init_std = init_std
        width = num_layers * 2 * num_kv_heads * head_dim
        factory = {"device": device, "dtype": torch.float32}
        if projection:
            if hidden_size is None:
                raise ValueError("hidden_size is required with projection=True")
            hidden = encoder_hidden_size or hidden_size
            self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, hidden_size, **factory))
            self.transform = nn.Sequential(
                nn.Linear(hidden_size, hidden, **factory), nn.Tanh(), nn.Linear(hidden, width, **factory)
            )
        else:
            self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, width, **factory))
            self.transform = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding, std=self.init_std)  # PEFT: nn.Embedding's N(0, 1)
        if self.transform is not None:
            self.transform[0].reset_parameters()
            self.transform[2].reset_parameters()

    @property
    def layer_width(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def table(self) -> torch.Tensor:
        """The whole prefix table ``(P, L·2·H_kv·D)``, fp32 (what is saved)."""
        if self.transform is None:
            return self.embedding
        return self.transform(self.embedding)

    def layer_kv(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``layer``, each ``(H_kv, P, D)`` in ``dtype``."""
        w = self.layer_width
        lo = layer * w
        if self.transform is None:
            rows = self.embedding[:, lo : lo + w]
        else:
            first, _, last = self.transform
            hidden = torch.tanh(first(self.embedding))
            rows = nn.functional.linear(hidden, last.weight[lo : lo + w], last.bias[lo : lo + w])
        kv = rows.to(dtype).view(self.num_virtual_tokens, 2, self.num_kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (2, H_kv, P, D)
        return kv[0], kv[1]

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, projection={self.projection}"
        )
