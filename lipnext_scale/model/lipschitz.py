"""Lipschitz bounds of a LipNeXt feature map, the one home of them: empirical (power iteration), rigorous
(from the weights) and the training monitor's (from the largest orthogonality error alone).

Both upper bounds rest on one inequality (paper.md B.1): for a matrix whose Gram matrix of the smaller side
is G = I + E, ||W||_2^2 = lambda_max(G) <= 1 + ||E||_2. The rigorous bound, which certification divides
radii by when weights are only approximately orthogonal, uses ||E||_2 <= ||E||_F; the monitor, which only
has max|E| (a collective over ZeRO-3 shards), uses ||E||_2 <= p max|E| with p the Gram size. All other
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


def spectral_norm_upper_bound(weight: torch.Tensor) -> float:
    """sqrt(1 + ||G - I||_F), computed in float64; >= ||W||_2 for any W."""
    return math.sqrt(1.0 + float(torch.linalg.matrix_norm(gram_minus_identity(weight), ord="fro")))


def rigorous_lipschitz_bound(model: torch.nn.Module) -> float:
    """Upper bound of the Lipschitz constant of `model.features` from its weights (>= 1 only by rounding)."""
    params = dict(model.named_parameters())
    per_matrix = {name: spectral_norm_upper_bound(params[name]) for name in set(model.lipschitz_path())}
    return math.prod(per_matrix[name] for name in model.lipschitz_path())


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
