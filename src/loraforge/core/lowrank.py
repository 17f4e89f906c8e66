"""Exact linear algebra on an update dW = s·B·A given by its factors A (r x in), B (out x r).

Nothing here builds the dense (out x in) matrix: the norm comes from two r x r Gram matrices and
the SVD from two thin QR factorizations and the SVD of a small core matrix. Work is in float64.
"""
from __future__ import annotations

import math

import torch


def factored_norm(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> float:
    """||s·B·A||_F without forming B·A: ||BA||_F^2 = tr((BᵀB)(AAᵀ)), both r x r and symmetric."""
    A, B = A.double(), B.double()
    gram_a, gram_b = A @ A.T, B.T @ B  # (r, r) each
    squared = float((gram_a * gram_b).sum())  # tr(XY) = sum(X * Y) for symmetric X, Y
    return abs(scaling) * math.sqrt(max(squared, 0.0))


def factored_svd(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of s·B·A, exact: Aᵀ = Qa Ra and B = Qb Rb (thin QR) give
    s·B·A = Qb (s·Rb Raᵀ) Qaᵀ, so only the small core s·Rb Raᵀ needs an SVD. S is descending;
    U is (out x k), Vh is (k x in) with k = min(r, out, in)."""
    qa, ra = torch.linalg.qr(A.double().T)  # (in, ka), (ka, r)
    qb, rb = torch.linalg.qr(B.double())  # (out, kb), (kb, r)
    core = scaling * (rb @ ra.T)  # (kb, ka)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def energy_rank(S: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k singular values hold `fraction` of the energy sum(S²) (0 for dW = 0)."""
    energy = S.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    k = int((cumulative < fraction - 1e-12).sum()) + 1  # tolerance: 1.0 must not need one more
    return min(k, S.numel())


def energy_kept(S: torch.Tensor, k: int) -> float:
    """Fraction of sum(S²) in the top k singular values (1.0 when dW = 0: nothing to lose).
    By Eckart–Young, 1 - energy_kept is (||dW - dW_k||_F / ||dW||_F)²."""
    energy = S.double() ** 2
    total = float(energy.sum())
    return 1.0 if total == 0.0 else float(energy[:k].sum()) / total


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A, B) of rank k with scaling·B·A = U_k diag(S_k) Vh_k, the root split evenly:
    A = sqrt(S_k / scaling) Vh_k, B = U_k sqrt(S_k / scaling)."""
    root = (S[:k].double() / scaling).sqrt()  # k <= len(S): callers cap the rank
    return root[:, None] * Vh[:k].double(), U[:, :k].double() * root[None, :]


def concat_factors(parts: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact combination: sum_i w_i B_i A_i as one adapter of rank sum(r_i) with scaling 1.
    `parts` holds (A_i, B_i, w_i * scaling_i); the result keeps the inputs' float precision."""
    dtype = torch.float64 if any(a.dtype == torch.float64 for a, _, _ in parts) else torch.float32
    A = torch.cat([a.to(dtype) for a, _, _ in parts], dim=0)  # (sum r, in)
    B = torch.cat([b.to(dtype) * coef for _, b, coef in parts], dim=1)  # (out, sum r)
    return A, B


def truncated_factors(A: torch.Tensor, B: torch.Tensor, k: int, scaling: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-k approximation of s·B·A (Eckart-Young) as factors with scaling 1, from the
    factored SVD; k is capped by the update's rank. Also returns all singular values."""
    U, S, Vh = factored_svd(A, B, scaling)
    k = min(k, S.numel())
    A_k, B_k = split_factors(U, S, Vh, k, 1.0)
    return A_k, B_k, S
