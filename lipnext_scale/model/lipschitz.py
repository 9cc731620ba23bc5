"""Lipschitz bounds of a LipNeXt feature map, the one home of them: empirical (power iteration), rigorous
(from the weights) and the training monitor's (from the largest orthogonality error alone).

Both upper bounds rest on one inequality (paper.md B.1): for a matrix whose Gram matrix of the smaller side
is G = I + E, ||W||_2^2 = lambda_max(G) <= 1 + ||E||_2. The rigorous bound, which certification divides
radii by when weights are only approximately orthogonal, bounds ||E||_2 by ||E^(2^k)||_F^(1/2^k) (E is
symmetric, so ||E||_2^(2^k) = ||E^(2^k)||_2 <= ||E^(2^k)||_F), computed in float64 with every rounding
error bounded (`spectral_norm_upper_bound`); the monitor, which only has max|E| (a collective over ZeRO-3
shards), uses ||E||_2 <= p max|E| with p the Gram size. All other
layers (shift, beta-Abs, pooling, patchify, mean subtraction, positional encoding and bias) are
1-Lipschitz by construction, so the feature map's constant is at most the product over
`model.lipschitz_path()`, the matrices an input passes through with repeats (the paper block applies R
and then M R^T).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lipnext_scale.model.layers import gram_minus_identity, manifold_parameters, orthogonality_error


UNIT_ROUNDOFF = 2.0 ** -53  # float64
SPECTRAL_POWER = 2  # k: ||E||_2 <= ||E^(2^k)||_F^(1/2^k); 2 squarings of the p x p Gram error


def _gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): |fl(x . y) - x . y| <= gamma_n |x| . |y| for a float64 dot product of length
    n (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5), whatever the summation order."""
    nu = n * UNIT_ROUNDOFF
    return nu / (1.0 - nu)


def _up(x: float, ulps: int = 4) -> float:
    """x rounded up by a few units in the last place: covers the rounding of one more float64 operation."""
    return x * (1.0 + ulps * UNIT_ROUNDOFF) if x > 0 else x


def _fro_upper(x: torch.Tensor) -> float:
    """An upper bound of ||x||_F (float64): the computed norm grown by the rounding of its sum of squares."""
    return _up(float(torch.linalg.matrix_norm(x)) * (1.0 + _gamma(x.numel() + 2)))


def gram_error_spectral_bound(weight: torch.Tensor, power: int = SPECTRAL_POWER) -> float:
    """A rigorous upper bound of ||G - I||_2 (G the Gram matrix of W's smaller side), rounding included.

    Computed in float64. (1) G^ = fl(W^T W) over sums of length n (W's longer side): ||G^ - G||_F <= gamma_n
    || |W|^T |W| ||_F <= gamma_n ||W||_F^2. (2) E^ = G^ - I and S = fl((E^ + E^T) / 2), symmetric by
    construction; ||S - E||_2 <= ||G^ - G||_F + u (||E^||_F + ||S||_F) (E is symmetric, so symmetrising
    never moves E^ further from it). (3) P_0 = S, P_{j+1} = fl(P_j P_j): with X_j = S^(2^j),
    ||P_{j+1} - X_{j+1}||_F <= (2 ||P_j||_F + e_j) e_j + gamma_p ||P_j||_F^2 =: e_{j+1}, e_0 = 0, so
    ||S||_2 <= (||P_k||_F + e_k)^(1/2^k). The result is the smaller of that and ||S||_F, plus step (2)'s
    distance. A fresh 4096 x 4096 fp32 orthogonal matrix: ||E||_F = 2.3e-6, this bound (k = 2) 1.4e-7.
    Non-finite weights give NaN (never certified)."""
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        return float("nan")
    n, p = max(w.shape), min(w.shape)
    gram = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()
    e_hat = gram - torch.eye(p, dtype=torch.float64, device=w.device)
    s = (e_hat + e_hat.t()) * 0.5
    w_fro2 = _up(float((w * w).sum()) * (1.0 + _gamma(w.numel() + 1)))
    s_fro = _fro_upper(s)
    moved = _up(_gamma(n) * w_fro2 + UNIT_ROUNDOFF * (_fro_upper(e_hat) + s_fro))
    best = s_fro
    pk, err = s, 0.0
    for _ in range(power):
        pk_fro = _fro_upper(pk)
        err = _up((2.0 * pk_fro + err) * err + _gamma(p) * pk_fro * pk_fro)
        pk = pk @ pk
    if power > 0:
        powered = _up(_up(_fro_upper(pk) + err) ** (1.0 / 2 ** power))
        if powered == powered:  # an overflow to inf is harmless (min), NaN cannot occur for finite weights
            best = min(best, powered)
    return _up(best + moved)


def spectral_norm_upper_bound(weight: torch.Tensor, power: int = SPECTRAL_POWER) -> float:
    """sqrt(1 + b), b a rigorous bound of ||G - I||_2 (`gram_error_spectral_bound`): >= ||W||_2 for any W."""
    return _up(math.sqrt(1.0 + gram_error_spectral_bound(weight, power)))


def rigorous_lipschitz_bound(model: torch.nn.Module) -> float:
    """Upper bound of the Lipschitz constant of `model.features` from its weights (>= 1 only by rounding)."""
    params = dict(model.named_parameters())
    per_matrix = {name: spectral_norm_upper_bound(params[name]) for name in set(model.lipschitz_path())}
    path = model.lipschitz_path()
    return _up(math.prod(per_matrix[name] for name in path), 2 * len(path))  # each product rounded once


def lipschitz_from_orthogonality_error(max_abs_error: float, shapes: list[tuple[int, int]]) -> float:
    """The training monitor's bound from the largest |X^T X - I| entry over all matrices: the product over
    `shapes` (the matrices of `model.lipschitz_path()` in order, with repeats) of sqrt(1 + p max|E|)."""
    log_bound = sum(0.5 * math.log1p(min(s) * max_abs_error) for s in shapes)
    return math.exp(log_bound)


def max_orthogonality_error(model: torch.nn.Module) -> float:
    """max over matrices of max |G - I|."""
    return max((orthogonality_error(w) for _, w in manifold_parameters(model)), default=0.0)


def jacobian_spectral_norm(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int = 50,
                           seed: int = 0) -> float:
    """Largest singular value of d fn / d x at x, by power iteration on J^T J with autograd."""
    x = x.detach()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        _, jv = torch.func.jvp(fn, (x,), (v,))
        _, vjp_fn = torch.func.vjp(fn, x)
        (jtjv,) = vjp_fn(jv)
        sigma = float(jv.detach().norm())
        v = (jtjv / jtjv.norm().clamp_min(1e-30)).detach()
    return sigma
