"""The Newton-Schulz polar retraction (the pre-FastExp default, kept for the heavy-ball ablation).

`retract_polar_ns(x, tangent)` returns the polar factor of X + D by Newton-Schulz, Y <- Y (3I - Y^T Y) / 2
(matmuls only, guarded by a Gram check with a counted QR fallback), in x's orientation. Matrices are
handled in tall form (n >= p, X^T X = I_p): a wide co-isometry is transposed, retracted, transposed back.
bf16/fp16 inputs are upcast to fp32; fp64 inputs stay fp64. The paper's FastExp retraction and the exact
polar are in `fast_exp.py`. QR, Cayley and the Stiefel-geodesic retractions were removed: the benchmark
(bench/results/optim.json before issue 10) had them slower than polar_ns per step (1.18x, 1.49x, 1.51x
AdamW vs 1.13x) with no accuracy or orthogonality advantage.
"""

from __future__ import annotations

import torch

RETRACTIONS = ("fast_exp", "polar_ns")  # optim.retraction; fast_exp: see fast_exp.py

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


def _qr_positive(y: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(y, mode="reduced")
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign


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


def orthogonalize_exact(x: torch.Tensor) -> torch.Tensor:
    """Nearest (semi-)orthogonal matrix (the polar factor, fp64 math) in the working dtype."""
    from lipnext_scale.optim.fast_exp import polar_exact

    return polar_exact(x.detach()).to(_work_dtype(x))


def retract(x: torch.Tensor, method: str, tangent: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """R_x(tangent) for the one-matrix retraction `polar_ns` (FastExp acts on skew generators, not on
    tangent vectors: see fast_exp.py). Keywords: `ns_iters`, `tol`, `stats` (counts NS iterations and fallbacks)."""
    if method != "polar_ns":
        raise ValueError(f"unknown retraction {method!r}; retract() implements polar_ns (fast_exp is "
                         "lipnext_scale.optim.fast_exp / manifold_update)")
    return retract_polar_ns(x, tangent, iters=kw.get("ns_iters", kw.get("iters", 6)), tol=kw.get("tol", NS_TOL),
                            stats=kw.get("stats"))
