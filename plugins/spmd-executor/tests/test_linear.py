"""Packed CPU matmuls: a bounded set of row counts (oneDNN caches a primitive per shape),
with results equal to the plain matmul for every real row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowserve_spmd_executor.layers.linear import onednn_linear_available, pack_weight, packed_linear, padded_rows


def test_row_counts_are_bounded_and_never_below_the_real_count():
    counts = [padded_rows(rows) for rows in range(1, 2049)]
    assert all(padded >= rows for rows, padded in zip(range(1, 2049), counts))
    assert all(padded - rows < 64 for rows, padded in zip(range(1, 2049), counts))
    assert counts[:16] == list(range(1, 17))  # decode batches run exact
    assert len(set(counts)) <= 16 + 31 + 24  # exact to 16, 32..512 by 16, 576..2048 by 64


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN packed linear")
@pytest.mark.parametrize("rows", [3, 16, 17, 100, 513])
def test_padded_packed_matmul_equals_the_plain_one(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 32, generator=generator)
    bias = torch.randn(48, generator=generator)
    x = torch.randn(rows, 32, generator=generator)
    out = packed_linear(x, pack_weight(weight), bias)
    assert out.shape == (rows, 48)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
