"""Retractions onto the (semi-)orthogonal manifold: pure functions, fp32 math.

Every function takes a point `x` (d_out, d_in) with orthonormal rows or columns and an optional tangent
step `tangent` (same shape), and returns `R_x(tangent)` in x's orientation. Matrices are handled in tall
form (n >= p, X^T X = I_p): a wide co-isometry is transposed, retracted, transposed back.
bf16/fp16 inputs are upcast to fp32 (the result is fp32: the caller keeps it as the master weight);
fp64 inputs stay fp64.

- qr:       qf(X + D) with the signs of diag(R) made positive (unique, continuous near X).
- polar_ns: polar factor of X + D by Newton-Schulz, Y <- Y (3I - Y^T Y) / 2: matmuls only.
- cayley:   (I - W/2)^{-1} (I + W/2) X with W = P D X^T - X (P D)^T, P = I - X X^T / 2 (Wen & Yin 2013);
            a 2p x 2p solve by Woodbury for tall X, a p x p solve for square X.
- exp:      the Stiefel geodesic of the canonical metric (Edelman, Arias & Smith 1998):
            [X Q] expm([[A, -R^T], [R, 0]]) [I; 0], A = skew(X^T D), QR = D - X X^T D; X expm(A) if square.
`orthogonalize_exact` (polar via SVD in fp64) is the rare exact re-orthogonalisation that removes drift.
"""

from __future__ import annotations

from typing import Callable

import torch

RETRACTIONS = ("qr", "cayley", "exp", "polar_ns")

# Newton-Schulz guard: converged when max|Y^T Y - I| <= NS_TOL; a run that stalls at the fp32 rounding floor
# is accepted below NS_ACCEPT_TOL; anything else falls back to QR (counted in `stats["ns_fallbacks"]`).
NS_TOL = 1e-6
NS_ACCEPT_TOL = 5e-6
# sigma_max^2 < 3 is NS's convergence region; Gershgorin on Y^T Y bounds sigma_max^2 from above.
NS_SIGMA2_LIMIT = 2.9


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_tall(x: torch.Tensor, tangent: torch.Tensor | None):
    """fp32 (or fp64) tall views of x and the tangent, and whether they were transposed."""
    dtype = _work_dtype(x)
    if x.dim() != 2:
        raise ValueError(f"retraction: expected a matrix, got a tensor of shape {tuple(x.shape)}")
    if tangent is not None and tangent.shape != x.shape:
        raise ValueError(f"retraction: tangent shape {tuple(tangent.shape)} != point shape {tuple(x.shape)}")
    wide = x.shape[0] < x.shape[1]
    x = x.to(dtype)
    t = None if tangent is None else tangent.to(dtype)
    if wide:
        x = x.mT
        t = None if t is None else t.mT
    return x, t, wide


def _from_tall(y: torch.Tensor, wide: bool) -> torch.Tensor:
    return (y.mT if wide else y).contiguous()


def _skew(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a - a.mT)


def _qr_positive(y: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(y, mode="reduced")
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign


def retract_qr(x: torch.Tensor, tangent: torch.Tensor | None = None) -> torch.Tensor:
    x, t, wide = _to_tall(x, tangent)
    return _from_tall(_qr_positive(x if t is None else x + t), wide)


def polar_newton_schulz(y: torch.Tensor, iters: int = 6, tol: float = NS_TOL,
                        stats: dict | None = None) -> torch.Tensor:
    """Polar factor of a tall y whose singular values are near 1; falls back to QR when it would not converge.

    Converges quadratically (sigma -> 1 - 3/2 (sigma - 1)^2) for singular values in (0, sqrt(3)). Up to
    `iters` iterations, then up to 2 * iters more if still improving; each iteration's Gram Y^T Y doubles
    as the convergence check, so a tiny step costs one or two Grams.
    """
    eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
    gram = y.mT @ y
    if float(gram.abs().sum(dim=1).max()) >= NS_SIGMA2_LIMIT:  # possibly outside the convergence region
        return _ns_fallback(y, stats, "spectrum outside sqrt(3)")
    err_prev = float("inf")
    for k in range(3 * iters + 1):
        dev = gram - eye
        err = float(dev.abs().max())
        stalled = err >= 0.5 * err_prev and err <= NS_ACCEPT_TOL
        if err <= tol or stalled:
            _count(stats, k)
            return y
        if k >= iters and err >= err_prev:  # past the normal budget and no longer improving
            break
        # One iteration maps every Gram eigenvalue error e to -3/4 e^2 + 1/4 e^3, so from a Frobenius error f
        # the next Gram error is at most 3/4 f^2 (1 + f) in every entry: when that is far below tol, the
        # iteration's result needs no Gram of its own (saves one of ~5 n p^2 matmuls per step).
        frob = float(torch.linalg.matrix_norm(dev)) if err < 1e-2 else float("inf")
        err_prev = err
        y = y @ (1.5 * eye - 0.5 * gram)
        if 0.75 * frob * frob * (1 + frob) <= 0.1 * tol:
            _count(stats, k + 1)
            return y
        gram = y.mT @ y
    return _ns_fallback(y, stats, f"error {err:.2e} after {k} iterations")


def _count(stats: dict | None, iters: int) -> None:
    if stats is not None:
        stats["ns_iters"] = stats.get("ns_iters", 0) + iters


def _ns_fallback(y: torch.Tensor, stats: dict | None, why: str) -> torch.Tensor:
    if stats is not None:
        stats["ns_fallbacks"] = stats.get("ns_fallbacks", 0) + 1
        stats["ns_fallback_reason"] = why
    return _qr_positive(y)


def retract_polar_ns(x: torch.Tensor, tangent: torch.Tensor | None = None, iters: int = 6,
                     tol: float = NS_TOL, stats: dict | None = None) -> torch.Tensor:
    x, t, wide = _to_tall(x, tangent)
    return _from_tall(polar_newton_schulz(x if t is None else x + t, iters, tol, stats), wide)


def _polished(y: torch.Tensor, polish: bool, stats: dict | None) -> torch.Tensor:
    """Cayley and exp map X to X C with C orthogonal: X's own error and C's rounding carry over and add up
    step after step. One Gram check (plus a Newton-Schulz iteration when needed) keeps the drift at fp32
    rounding level between the exact re-orthogonalisations."""
    return polar_newton_schulz(y, iters=2, stats=stats) if polish else y


def retract_cayley(x: torch.Tensor, tangent: torch.Tensor | None = None, polish: bool = True,
                   stats: dict | None = None) -> torch.Tensor:
    x, t, wide = _to_tall(x, tangent)
    if t is None:
        return _from_tall(x, wide)
    n, p = x.shape
    eye = torch.eye(p, dtype=x.dtype, device=x.device)
    if n == p:  # Y = X (I - A/2)^{-1} (I + A/2), A = skew(X^T D): a p x p solve
        a = _skew(x.mT @ t)
        return _from_tall(_polished(x @ torch.linalg.solve(eye - 0.5 * a, eye + 0.5 * a), polish, stats), wide)
    pd = t - 0.5 * (x @ (x.mT @ t))  # P D
    u = torch.cat([pd, x], dim=1)  # W = U V^T
    v = torch.cat([x, -pd], dim=1)
    eye2 = torch.eye(2 * p, dtype=x.dtype, device=x.device)
    inner = torch.linalg.solve(eye2 - 0.5 * (v.mT @ u), v.mT @ x)  # Woodbury: (I - W/2)^{-1} W X = U inner
    return _from_tall(_polished(x + u @ inner, polish, stats), wide)


def retract_exp(x: torch.Tensor, tangent: torch.Tensor | None = None, polish: bool = True,
                stats: dict | None = None) -> torch.Tensor:
    x, t, wide = _to_tall(x, tangent)
    if t is None:
        return _from_tall(x, wide)
    n, p = x.shape
    xt = x.mT @ t
    a = _skew(xt)
    if n == p:
        return _from_tall(_polished(x @ torch.linalg.matrix_exp(a), polish, stats), wide)
    q, r = torch.linalg.qr(t - x @ xt, mode="reduced")
    block = torch.cat([torch.cat([a, -r.mT], dim=1), torch.cat([r, torch.zeros_like(r)], dim=1)], dim=0)
    mn = torch.linalg.matrix_exp(block)[:, :p]
    return _from_tall(_polished(x @ mn[:p] + q @ mn[p:], polish, stats), wide)


def orthogonalize_exact(x: torch.Tensor) -> torch.Tensor:
    """Nearest (semi-)orthogonal matrix U V^T (polar factor by SVD in fp64), in the working dtype."""
    dtype = _work_dtype(x)
    u, _, vh = torch.linalg.svd(x.detach().to(torch.float64), full_matrices=False)
    return (u @ vh).to(dtype)


_BY_NAME: dict[str, Callable[..., torch.Tensor]] = {
    "qr": retract_qr, "cayley": retract_cayley, "exp": retract_exp, "polar_ns": retract_polar_ns,
}


def retract(x: torch.Tensor, method: str, tangent: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """R_x(tangent) by `method` (one of RETRACTIONS). Keywords: `ns_iters`, `tol` (polar_ns), `polish`
    (cayley, exp), `stats` (a dict that counts Newton-Schulz iterations and fallbacks)."""
    if method not in _BY_NAME:
        raise ValueError(f"unknown retraction {method!r}; choose one of {', '.join(RETRACTIONS)}")
    stats = kw.get("stats")
    if method == "polar_ns":
        return retract_polar_ns(x, tangent, iters=kw.get("ns_iters", kw.get("iters", 6)),
                                tol=kw.get("tol", NS_TOL), stats=stats)
    if method == "qr":
        return retract_qr(x, tangent)
    return _BY_NAME[method](x, tangent, polish=kw.get("polish", True), stats=stats)
