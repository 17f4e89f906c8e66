"""The shared low-rank math (`loraforge.core.lowrank`) against dense computations."""
from __future__ import annotations

import pytest
import torch

from loraforge.core.lowrank import energy_kept, energy_rank, factored_norm, factored_svd, split_factors


@pytest.mark.parametrize("out_f, in_f, r, scaling", [(12, 9, 4, 2.0), (6, 5, 8, 0.5), (7, 10, 3, 1.0)])
def test_factored_norm_and_svd_match_dense(out_f, in_f, r, scaling):
    gen = torch.Generator().manual_seed(out_f * in_f + r)
    A, B = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
    B[:, 0] = 0  # rank-deficient: one direction carries nothing
    dense = scaling * (B.double() @ A.double())
    assert factored_norm(A, B, scaling) == pytest.approx(float(dense.norm()), rel=1e-12)
    U, S, Vh = factored_svd(A, B, scaling)
    expected = torch.linalg.svdvals(dense)
    torch.testing.assert_close(S, expected[:S.numel()], atol=1e-10, rtol=1e-10)
    assert float(expected[S.numel():].abs().sum()) < 1e-10  # nothing beyond k = min(r, out, in)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.eye(S.numel(), dtype=torch.float64), atol=1e-10, rtol=0)


def test_energy_rank_and_kept_on_hand_made_values():
    S = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(S, 0.5) == 1  # 9/14 = 0.64
    assert energy_rank(S, 0.9) == 2  # 13/14 = 0.93
    assert energy_rank(S, 0.99) == 3 and energy_rank(S, 1.0) == 3
    assert energy_kept(S, 1) == pytest.approx(9 / 14) and energy_kept(S, 3) == 1.0
    assert energy_rank(torch.zeros(3), 0.9) == 0 and energy_kept(torch.zeros(3), 1) == 1.0


def test_split_factors_reproduce_the_truncation_at_any_scaling():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 8, generator=gen), torch.randn(6, 5, generator=gen)
    U, S, Vh = factored_svd(A, B, 1.5)
    for k, scaling in [(5, 1.5), (2, 0.25)]:
        A2, B2 = split_factors(U, S, Vh, k, scaling)
        assert A2.shape == (k, 8) and B2.shape == (6, k)
        torch.testing.assert_close(scaling * B2 @ A2, U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], atol=1e-10, rtol=0)
