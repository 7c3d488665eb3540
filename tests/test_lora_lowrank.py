"""lowrank.low_rank: a ΔW is exact at its full rank, the dynamic methods choose the rank kohya sd-scripts'
networks/resize_lora.py chooses (expected ranks worked out by hand below from its formulas), the reported error is
the measured one, a truncation's error is the SVD tail, conv ΔW keep their kernel on down, and a zero ΔW is rank 1."""

from __future__ import annotations

import pytest
import torch

from trainer.lora_tools.lowrank import choose_rank, low_rank

S = torch.tensor([10.0, 5.0, 3.0, 1.0, 0.5, 0.1])


def with_singular_values(s: torch.Tensor, rows: int = 9, cols: int = 6, seed: int = 0) -> torch.Tensor:
    """A [rows, cols] matrix whose singular values are exactly `s` (orthonormal factors from QR)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return (u * s.double()) @ v.T


def measured(delta, result) -> float:
    d = delta.double().reshape(delta.shape[0], -1)
    product = result.up.double().reshape(result.up.shape[0], -1) @ result.down.double().reshape(result.rank, -1)
    return float(torch.linalg.matrix_norm(d - product) / torch.linalg.matrix_norm(d))


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (6, 4, 3, 3), (6, 4, 1, 1)])
def test_exact_at_full_rank(shape):
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    full = min(shape[0], delta[0].numel())
    result = low_rank(delta, rank=64)  # capped at the full rank
    assert result.rank == full
    assert result.error < 1e-6 and result.kept == pytest.approx(1.0, abs=1e-9)
    assert abs(result.error - measured(delta, result)) < 1e-7


# Expected ranks from kohya's formulas with S = [10, 5, 3, 1, 0.5, 0.1] (index + 1, index clamped to [0, 5]):
# sv_ratio X: count of s > 10/X, minus one, plus one.  X=4: s > 2.5 -> {10,5,3} -> 3.  X=20: s > 0.5 -> 4 (0.5 is
#   not > 0.5).  X=1000: all 6 -> 6.  X=1: none > 10 -> index -1 clamped to 0 -> 1.
# sv_fro X: first i with Σ_{≤i} s² / Σ s² ≥ X².  Σ s² = 135.26; cumulative 100, 125, 134, 135, 135.25, 135.26 ->
#   0.7393, 0.9242, 0.9907, 0.9981, 0.99993, 1.  X=0.8 (0.64) -> i=0 -> 1.  X=0.9 (0.81) -> 2.  X=0.99 (0.9801) -> 3.
#   X=0.999 (0.998001) -> 4.  X=0.9995 (0.99900) -> 5.
# sv_cumulative X: first i with Σ_{≤i} s / Σ s ≥ X.  Σ s = 19.6; cumulative 10, 15, 18, 19, 19.5, 19.6 -> 0.5102,
#   0.7653, 0.9184, 0.9694, 0.9949, 1.  X=0.5 -> 1.  X=0.8 -> 3.  X=0.95 -> 4.  X=0.99 -> 5.  X=2 -> 6 (clamped).
CASES = [("sv_ratio", 4, 3), ("sv_ratio", 20, 4), ("sv_ratio", 1000, 6), ("sv_ratio", 1, 1),
         ("sv_fro", 0.8, 1), ("sv_fro", 0.9, 2), ("sv_fro", 0.99, 3), ("sv_fro", 0.999, 4), ("sv_fro", 0.9995, 5),
         ("sv_cumulative", 0.5, 1), ("sv_cumulative", 0.8, 3), ("sv_cumulative", 0.95, 4),
         ("sv_cumulative", 0.99, 5), ("sv_cumulative", 2.0, 6)]


@pytest.mark.parametrize("method,param,expected", CASES)
def test_dynamic_methods_choose_kohyas_rank(method, param, expected):
    assert choose_rank(S, method, param, None) == expected
    assert choose_rank(S, method, param, 2) == min(expected, 2)  # --rank caps the dynamic choice
    delta = with_singular_values(S).float()
    result = low_rank(delta, dynamic=method, param=param)
    assert result.rank == expected
    kept = (S[:expected].double().pow(2).sum() / S.double().pow(2).sum()).sqrt()
    assert result.kept == pytest.approx(float(kept), abs=1e-6)
    tail = (S[expected:].double().pow(2).sum() / S.double().pow(2).sum()).sqrt()  # Eckart-Young: the SVD tail
    assert result.error == pytest.approx(float(tail), abs=1e-6)
    assert result.error == pytest.approx(measured(delta, result), abs=1e-7)


def test_fixed_rank_truncation_error_is_the_svd_tail():
    delta = with_singular_values(S, rows=20, cols=16).float()
    for rank in (1, 2, 3):
        result = low_rank(delta, rank=rank)
        tail = (S[rank:].pow(2).sum() / S.pow(2).sum()).sqrt()
        assert result.rank == rank and result.up.shape == (20, rank) and result.down.shape == (rank, 16)
        assert result.error == pytest.approx(float(tail), abs=1e-6)
        assert result.error == pytest.approx(measured(delta, result), abs=1e-7)
        assert result.kept ** 2 + result.error ** 2 == pytest.approx(1.0, abs=1e-6)
    # kohya's split: up = U·S, down = Vh (rows of down are orthonormal)
    down = low_rank(delta, rank=3).down.double()
    assert torch.allclose(down @ down.T, torch.eye(3, dtype=torch.float64), atol=1e-5)


def test_conv_shapes_and_exactness():
    g = torch.Generator().manual_seed(2)
    delta = (torch.randn(8, 2, generator=g) @ torch.randn(2, 4 * 9, generator=g)).reshape(8, 4, 3, 3)
    result = low_rank(delta, rank=4)
    assert result.down.shape == (4, 4, 3, 3) and result.up.shape == (8, 4, 1, 1)
    assert result.error < 1e-6  # rank 4 ≥ the true rank 2
    product = (result.up.flatten(1) @ result.down.flatten(1)).reshape(delta.shape)
    assert (product - delta).abs().max() / delta.abs().max() < 1e-5
    one = low_rank(delta, dynamic="sv_ratio", param=1e6)  # keeps every s above s_max·1e-6: the true rank 2
    assert one.rank == 2 and one.error < 1e-5


def test_large_matrix_small_rank_uses_a_measured_sketch():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(1024, 3, generator=g) @ torch.randn(3, 1100, generator=g) + 1e-4 * torch.randn(
        1024, 1100, generator=g)
    result = low_rank(delta, rank=8)
    assert result.rank == 8
    assert result.error == pytest.approx(measured(delta, result), rel=1e-4)
    assert result.error < 0.01


def test_zero_delta_is_rank_one_zeros():
    for shape in [(5, 3), (5, 3, 3, 3)]:
        result = low_rank(torch.zeros(shape), rank=4)
        assert result.rank == 1 and result.kept == 1.0 and result.error == 0.0
        assert not result.up.any() and not result.down.any()
        assert result.down.shape[1:] == shape[1:]
    assert choose_rank(torch.tensor([1e-7, 0.0]), "sv_fro", 0.9, 8) == 1  # kohya: s_max ≤ 1e-6 counts as zero


def test_bad_arguments_say_what_is_missing():
    with pytest.raises(ValueError, match="rank"):
        low_rank(torch.ones(3, 3))
    with pytest.raises(ValueError, match="dynamic method"):
        low_rank(torch.ones(3, 3), dynamic="sv_knee", param=1.0)
    with pytest.raises(ValueError, match="param"):
        low_rank(torch.ones(3, 3), dynamic="sv_fro")
    with pytest.raises(ValueError, match="Conv2d"):
        low_rank(torch.ones(3, 3, 3))
