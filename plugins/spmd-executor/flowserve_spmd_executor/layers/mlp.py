"""The gated MLP of decoder layers, ``down(act(gate(x)) * up(x))``, tensor parallel (gate and
up column-parallel in one fused matmul, down row-parallel)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: HF activation names → functions (Gemma's GeGLU uses the tanh approximation of GELU)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu_pytorch_tanh": _gelu_tanh, "gelu_tanh": _gelu_tanh, "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU with ``silu``, GeGLU with a GELU. A checkpoint may
    store gate and up apart (``gate_proj``/``up_proj``, shard ids 0 and 1) or fused
    (``gate_up_proj``, Phi-3)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, act: str,
                 group: TensorParallelGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias, group)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, group)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)
