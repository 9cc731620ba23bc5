"""FastExp (the paper's truncated exponential), its Stiefel action, a Newton-Schulz polish and the exact
polar factor: pure, batched functions on (..., n, p) tensors (paper.md A "Optimizer", B.5).

FastExp(A) for skew A, by ||A||_F:  I + A + A^2/2 (< 0.05),  + A^3/6 (< 0.25),  + A^4/24 (< 1),  exp(A) above.
The branch is chosen per matrix on the device (0/1 coefficients, no host read), so a batch of matrices
costs two matmuls; only whether any matrix of the batch needs the exact exponential is read on the host
(one read per call, not per matrix). Truncating after order k leaves an error of at most
sum_{j>k} ||A||^j / j! <= ||A||^(k+1) / (k+1)! * e^||A|| (Frobenius norms are submultiplicative):
see `fast_exp_error_bound`.

Semi-orthogonal (tall, X^T X = I_p, n > p) matrices move by a left rotation exp(Omega) X with the rank-2p
skew generator Omega = c (D X^T - X D^T) (Wen & Yin's descent curve; it keeps X^T X exactly and moves the
column space). With U = [D, X], V = c [X, -D], Omega = U V^T and Omega^k = U S^(k-1) V^T for S = V^T U
(2p x 2p), so the same truncated series is X + U P(S) V^T X, P(S) = sum_k S^(k-1) / k!: n x p matmuls and
2p x 2p ones, never an n x n matrix. For a square X, exp(Omega) X = X exp(X^T Omega X): the two agree.
"""

from __future__ import annotations

import math

import torch

FASTEXP_THRESHOLDS = (0.05, 0.25, 1.0)  # ||A||_F below which Taylor orders 2, 3, 4 are used


def taylor_order(norm: float) -> int | None:
    """The Taylor order FastExp uses at Frobenius norm `norm` (None: the exact exponential)."""
    for order, limit in zip((2, 3, 4), FASTEXP_THRESHOLDS):
        if norm < limit:
            return order
    return None


def fast_exp_error_bound(norm: float) -> float:
    """Upper bound of ||FastExp(A) - exp(A)||_F for ||A||_F = norm (0 on the exact branch; rounding aside)."""
    order = taylor_order(norm)
    if order is None:
        return 0.0
    return norm ** (order + 1) / math.factorial(order + 1) * math.exp(norm)


def _coefficients(norms: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 weights of the A^3 and A^4 terms per matrix, shaped to broadcast over (..., p, p)."""
    c3 = (norms >= FASTEXP_THRESHOLDS[0]).to(dtype)[..., None, None]
    c4 = (norms >= FASTEXP_THRESHOLDS[1]).to(dtype)[..., None, None]
    return c3, c4


def _eye_like(a: torch.Tensor) -> torch.Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def fast_exp(a: torch.Tensor) -> torch.Tensor:
    """FastExp of a (batch of) skew matrices (..., p, p), in a's dtype (bf16/fp16 are computed in fp32)."""
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"fast_exp: expected (..., p, p) skew matrices, got shape {tuple(a.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    norms = torch.linalg.matrix_norm(a)
    c3, c4 = _coefficients(norms, a.dtype)
    eye = _eye_like(a)
    a2 = a @ a
    # Horner: I + A + A^2 (I/2 + c3 A/6 + c4 A^2/24): two matmuls for every branch
    y = a2 @ (0.5 * eye + (c3 / 6.0) * a + (c4 / 24.0) * a2) + a + eye
    exact = norms >= FASTEXP_THRESHOLDS[2]
    if bool(exact.any()):  # one host read per batch; a realistic step never takes this branch
        y = torch.where(exact[..., None, None], torch.linalg.matrix_exp(a), y)
    return y


def tall_generator_norm(x: torch.Tensor, d: torch.Tensor, coef: float) -> torch.Tensor:
    """||c (D X^T - X D^T)||_F per matrix from p x p products: 2 tr(D^T D X^T X) - 2 tr((X^T D)^2)."""
    return _tall_norm(x.mT @ x, x.mT @ d, d.mT @ d, coef)


def _tall_norm(xx, xd, dd, coef):
    sq = 2.0 * (dd * xx).sum((-2, -1)) - 2.0 * (xd * xd.mT).sum((-2, -1))
    return abs(coef) * sq.clamp_min(0).sqrt()


def stiefel_exp_action(x: torch.Tensor, d: torch.Tensor, coef: float) -> torch.Tensor:
    """FastExp(Omega) X for Omega = coef (D X^T - X D^T), tall x and d (..., n, p) (n > p allowed, = p works)."""
    xx, xd, dd = x.mT @ x, x.mT @ d, d.mT @ d
    norms = _tall_norm(xx, xd, dd, coef)
    s = coef * torch.cat([torch.cat([xd, xx], -1), torch.cat([-dd, -xd.mT], -1)], -2)  # V^T U
    w = coef * torch.cat([xx, -xd.mT], -2)  # V^T X
    c3, c4 = _coefficients(norms, x.dtype)
    eye = _eye_like(s)
    poly = s @ (0.5 * eye + s @ ((c3 / 6.0) * eye + (c4 / 24.0) * s)) + eye  # I + S/2 + c3 S^2/6 + c4 S^3/24
    exact = norms >= FASTEXP_THRESHOLDS[2]
    if bool(exact.any()):  # phi(S) = sum_k S^k/(k+1)! is the top-right block of exp([[S, I], [0, 0]])
        two_p = s.shape[-1]
        block = torch.zeros(*s.shape[:-2], 2 * two_p, 2 * two_p, dtype=s.dtype, device=s.device)
        block[..., :two_p, :two_p] = s
        block[..., :two_p, two_p:] = eye
        phi = torch.linalg.matrix_exp(block)[..., :two_p, two_p:]
        poly = torch.where(exact[..., None, None], phi, poly)
    return x + torch.cat([d, x], -1) @ (poly @ w)


def ns_polish(y: torch.Tensor) -> torch.Tensor:
    """One Newton-Schulz step toward the polar factor, Y (3I - Y^T Y)/2 (tall y): an orthogonality error e
    becomes ~3/4 e^2, so truncation and rounding errors never accumulate from step to step."""
    gram = y.mT @ y
    return y @ (1.5 * _eye_like(gram) - 0.5 * gram)


def polar_exact(x: torch.Tensor) -> torch.Tensor:
    """Polar factor X (X^T X)^(-1/2) in fp64 (either orientation, batched), by an eigendecomposition of the
    small Gram matrix (an SVD of the full matrix is slow on GPU); SVD if the Gram is near singular."""
    x64 = x.detach().to(torch.float64)
    wide = x64.shape[-2] < x64.shape[-1]
    xt = x64.mT if wide else x64
    evals, evecs = torch.linalg.eigh(xt.mT @ xt)
    if bool((evals.amin(-1) > 1e-12).all()):
        out = xt @ (evecs * evals.rsqrt()[..., None, :]) @ evecs.mT
    else:
        u, _, vh = torch.linalg.svd(xt, full_matrices=False)
        out = u @ vh
    return (out.mT if wide else out).contiguous()
