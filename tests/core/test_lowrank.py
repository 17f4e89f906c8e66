"""The shared low-rank math (`loraforge.core.lowrank`) against dense computations."""
from __future__ import annotations

import pytest
import torch

from loraforge.core.lowrank import (concat_factors, energy_kept, energy_rank, factored_norm, factored_svd,
                                     split_factors, truncated_factors)

IN, OUT = 32, 24


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


def test_concat_factors_is_exact_weighted_sum():
    gen = torch.Generator().manual_seed(0)
    parts = [(torch.randn(r, IN, generator=gen), torch.randn(OUT, r, generator=gen), c)
             for r, c in ((2, 0.5), (3, -1.5))]
    A, B = concat_factors(parts)
    assert A.shape == (5, IN) and B.shape == (OUT, 5)
    expected = sum(c * b @ a for a, b, c in parts)
    torch.testing.assert_close(B @ A, expected, atol=1e-5, rtol=1e-5)


def _factor(delta):
    """delta as factors (A, B) = (delta, I): a rank-min(out, in) update given by its factors."""
    return delta, torch.eye(delta.shape[0])


def test_truncated_factors_full_and_truncated():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(OUT, 5, generator=gen) @ torch.randn(5, IN, generator=gen)
    A, B, S = truncated_factors(*_factor(delta), 5)
    torch.testing.assert_close((B @ A).float(), delta, atol=1e-4, rtol=1e-4)
    A2, B2, _ = truncated_factors(*_factor(delta), 2)
    assert A2.shape == (2, IN) and B2.shape == (OUT, 2)
    error = torch.linalg.matrix_norm((B2 @ A2).float() - delta)
    torch.testing.assert_close(error, S[2:].square().sum().sqrt().float(), atol=1e-3, rtol=1e-3)  # Eckart-Young
    A3, _, _ = truncated_factors(*_factor(delta), 100)  # rank is capped by the matrix
    assert A3.shape[0] == min(OUT, IN)
