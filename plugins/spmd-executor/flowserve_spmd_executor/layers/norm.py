"""RMSNorm, optionally fused with the residual add that precedes it, and its variants: Gemma's
(``1 + weight``) and one over features split across tensor-parallel ranks (OLMo 2's q/k norm)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, computed in float32 and cast back before the weight (as HF
    Llama does, which matters in half precision)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused op; same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)``."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class FloatWeightRMSNorm(RMSNorm):
    """``weight * x / rms(x)`` with the weight applied in float32 before the cast back (OLMo 2's
    order; Llama casts first). The same numbers in float32; in bfloat16 the rounding differs."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's ``x / rms(x) * (1 + weight)``, all in float32 and cast back at the end (its
    checkpoints store ``weight`` as the offset from one)."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a feature dimension that tensor parallelism splits (OLMo 2 normalises the
    whole q and k projections, not each head): the sum of squares is all-reduced. ``copies``:
    how many ranks hold the same features (replicated KV heads), so they count once."""

    def __init__(self, start: int, local_size: int, full_size: int, eps: float, group: TensorParallelGroup,
                 copies: int = 1):
        super().__init__()
        self.start, self.eps, self.full_size, self.group, self.copies = start, eps, full_size, group, copies
        self.weight = nn.Parameter(torch.empty(local_size), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        """Copy this rank's features ``[start, start + local_size)`` of the checkpoint's weight."""
        param.data.copy_(source.read(0, self.start, param.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        squares = h.pow(2).sum(-1, keepdim=True)
        if self.group.world_size > 1:
            squares = self.group.all_reduce(squares) / self.copies
        h = h * torch.rsqrt(squares / self.full_size + self.eps)
        return (self.weight * h).to(x.dtype)
