"""Rotary position embeddings: inverse frequencies per scaling type, a cos/sin table, and
their application to queries and keys (the "rotate half" convention of HF Llama).

Scaling types: ``default``, ``linear`` (positions divided by ``factor``), ``llama3``
(Llama 3.1's frequency-dependent scaling) and ``yarn`` (with its attention factor). Dynamic
NTK and LongRoPE change with the sequence length and are refused by ``model_config``.
"""

from __future__ import annotations

import math

import torch

from flowserve_spmd_executor.model_config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim // 2] float32, attention_scaling)`` as transformers computes them."""
    base, dim = rope.theta, head_dim
    # Explicit CPU: the model may be constructed under a "meta" device context.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if rope.type == "yarn":
        return _yarn(rope, dim)
    raise ValueError(f"rope type {rope.type!r} is not supported")


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old_context = rope.original_max_position_embeddings or 8192
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    original = rope.original_max_position_embeddings or 2048

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid dividing by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """A cos/sin table for positions ``[0, max_positions)``; ``lookup`` gathers one step's rows
    once, and ``apply`` rotates queries and keys of every layer with them."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        inv_freq, scaling = inverse_frequencies(rope, head_dim)
        positions = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # Computed in float32 and cast afterwards, as transformers does. Plain attributes, not
        # buffers: they are built for ``device`` and ``dtype`` already, and must survive the
        # loader's ``to_empty`` of the module tree. The sine's first half is negated so that
        # ``rotate_half(x) * sin`` becomes ``swap_halves(x) * signed_sin`` (fewer ops per layer).
        sin = emb.sin() * scaling
        half = inv_freq.shape[0]
        self.cos = (emb.cos() * scaling).to(dtype=dtype, device=device)
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[T, 1, head_dim]`` for flat ``positions [T]`` (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]``: ``x * cos + rotate_half(x) * sin`` (HF Llama's
    convention), computed as ``x * cos + swap_halves(x) * signed_sin``."""
    tokens, heads, dim = x.shape
    swapped = x.reshape(tokens, heads, 2, dim // 2).flip(2).view(tokens, heads, dim)
    return torch.addcmul(x * cos, swapped, signed_sin)

