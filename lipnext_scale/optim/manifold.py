"""Riemannian momentum on the (semi-)orthogonal manifold: pure functions on one matrix, fp32 math.

For a tall X (X^T X = I) the tangent space is {D : X^T D skew} and the projection onto it is
`D - X sym(X^T D)`; the Riemannian gradient (embedded metric) is the projection of the Euclidean one,
`G - X sym(X^T G)` (paper.md A). A wide co-isometry (X X^T = I) is handled as its transpose.
The single-process optimizer and the ZeRO-3 owner ranks both call `riemannian_momentum_step`, so the two
modes compute bit-for-bit the same update from the same inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lipnext_scale.errors import LipnextError
from lipnext_scale.model.layers import orthogonality_error  # one definition, shared with certification
from lipnext_scale.optim.retraction import orthogonalize_exact, retract

if TYPE_CHECKING:
    from lipnext_scale.config import OptimConfig


class ManifoldParameterError(LipnextError, ValueError):
    """A parameter tagged orthogonal cannot be trained on the manifold; the message names it and the fix."""


def sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mT)


def _tall(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (x.mT, True) if x.shape[0] < x.shape[1] else (x, False)


def project_tangent(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of d onto the tangent space at x (either orientation)."""
    xt, wide = _tall(x)
    dt = d.mT if wide else d
    out = dt - xt @ sym(xt.mT @ dt)
    return out.mT if wide else out


def riemannian_grad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad f(X) = G - X sym(X^T G) (for wide X: the same on the transposes)."""
    return project_tangent(x, g)


def tangent_skew_error(x: torch.Tensor, d: torch.Tensor) -> float:
    """max |sym(X^T D)| in fp64 (tall orientation): 0 iff d is tangent at x."""
    xt, wide = _tall(x.to(torch.float64))
    dt = d.to(torch.float64)
    dt = dt.mT if wide else dt
    return float(sym(xt.mT @ dt).abs().max())


def init_tolerance(dtype: torch.dtype) -> float:
    """Largest orthogonality error accepted for an initial weight stored in `dtype` (its rounding level)."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2  # fp64 weights are often fp32-initialised


def check_manifold_parameter(name: str, shape: tuple[int, ...], value: torch.Tensor | None = None) -> None:
    """Raise ManifoldParameterError for a non-matrix, or (with `value`) a matrix that is not (semi-)orthogonal."""
    if len(shape) != 2 or min(shape) < 1:
        raise ManifoldParameterError(
            f"parameter {name!r} is tagged orthogonal (its module lists it in manifold_names) but has shape "
            f"{tuple(shape)}: only non-empty 2-D matrices live on the orthogonal manifold; "
            "untag the module or reshape the parameter to (d_out, d_in)")
    if value is None or value.is_meta:
        return
    if not torch.isfinite(value).all():
        raise ManifoldParameterError(f"parameter {name!r} has NaN/Inf entries; re-initialise it "
                                     "(nn.init.orthogonal_) before building the optimizer")
    err, tol = orthogonality_error(value), init_tolerance(value.dtype)
    if err > tol:
        side = "W^T W" if shape[0] >= shape[1] else "W W^T"
        raise ManifoldParameterError(
            f"parameter {name!r} of shape {tuple(shape)} is not (semi-)orthogonal: max|{side} - I| = {err:.3g} "
            f"> {tol:g} for {value.dtype}; initialise it with nn.init.orthogonal_ or project it with "
            "lipnext_scale.optim.orthogonalize_exact before building the optimizer")


def riemannian_momentum_step(x: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None, *,
                             lr: float, cfg: OptimConfig, exact: bool = False, stats: dict | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One heavy-ball step on the manifold; returns (new point, new momentum), both fp32 (fp64 stays fp64).
    Of `cfg`: momentum, retraction (R) and ns_iters (polar_ns's Newton-Schulz iterations).

    m <- momentum * proj_X(m) + grad_R f(X)   (the old momentum lives at the previous point: re-project)
    X <- R_X(-lr m)                           (then, if `exact`, the exact polar re-orthogonalisation)
    """
    momentum, method, ns_iters = cfg.momentum, cfg.retraction, cfg.ns_iters
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, g = x.to(dtype), grad.to(dtype)
    if momentum_buffer is None or momentum == 0.0:
        buf = riemannian_grad(x, g)
    else:  # the projection is linear: proj(mu m) + proj(g) = proj(mu m + g), one projection not two
        buf = project_tangent(x, momentum_buffer.to(dtype).mul(momentum).add_(g))
    new = retract(x, method, tangent=-lr * buf, ns_iters=ns_iters, stats=stats)
    if exact:
        new = orthogonalize_exact(new)
    return new, buf
