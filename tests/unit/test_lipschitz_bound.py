"""The rigorous per-matrix bound certification divides radii by: ||W||_2^2 <= 1 + b with b >= ||W^T W - I||_2,
rounding included (model/lipschitz.py), tight enough for 1B/2B paths at the default tolerance (issue 21)."""

from __future__ import annotations

import math

import pytest
import torch

from lipnext_scale.model import get_spec
from lipnext_scale.model.layers import gram_minus_identity, orthogonal_
from lipnext_scale.model.lipschitz import gram_error_spectral_bound, spectral_norm_upper_bound


def _true_gram_error(w: torch.Tensor) -> float:
    """||W^T W - I||_2 from the fp64 Gram's eigenvalues (a reference, not a bound)."""
    return float(torch.linalg.eigvalsh(gram_minus_identity(w)).abs().max())


def _orthogonal(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(seed)
    return orthogonal_(torch.empty(rows, cols, dtype=dtype))


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96)])
@pytest.mark.parametrize("kind", ["rounded", "rank_one", "scaled", "random"])
def test_the_bound_is_above_the_spectral_norm_of_the_gram_error(shape, kind):
    w = _orthogonal(*shape, seed=len(kind)).double()
    torch.manual_seed(1)
    if kind == "rank_one":  # one direction stretched: ||E||_2 = ||E||_F, the power bound must not undercut it
        u = torch.randn(min(shape), dtype=torch.float64)
        u /= u.norm()
        stretch = torch.eye(min(shape), dtype=torch.float64) + 0.01 * torch.outer(u, u)
        w = w @ stretch if shape[0] >= shape[1] else stretch @ w
    elif kind == "scaled":
        w = w * 1.001
    elif kind == "random":
        w = w + 1e-4 * torch.randn(shape, dtype=torch.float64)
    w = w.float()
    true = _true_gram_error(w)
    for power in (0, 1, 2, 3):
        bound = gram_error_spectral_bound(w, power)
        assert bound >= true, (kind, power, bound, true)
        assert bound <= float(torch.linalg.matrix_norm(gram_minus_identity(w))) * (1 + 1e-9) + 1e-12
    assert spectral_norm_upper_bound(w) >= float(torch.linalg.matrix_norm(w.double(), ord=2))


def test_a_stretched_matrix_is_caught_by_its_spectral_norm():
    w = _orthogonal(32, 32, seed=0).double()
    w[:, 0] *= 1.1  # ||W||_2 = 1.1 (to the fp32 rounding of the orthogonal matrix)
    true = float(torch.linalg.matrix_norm(w, ord=2))
    assert abs(true - 1.1) < 1e-6
    assert true <= spectral_norm_upper_bound(w) <= true * (1 + 1e-9)


def test_non_finite_weights_give_nan():
    w = _orthogonal(8, 8, seed=0)
    w[0, 0] = float("nan")
    assert math.isnan(spectral_norm_upper_bound(w))
    w[0, 0] = float("inf")
    assert math.isnan(spectral_norm_upper_bound(w))


def test_powers_tighten_the_bound_on_rounding_noise():
    """Rounding an orthogonal matrix to fp32 spreads E's energy over every eigenvalue: ||E||_2 << ||E||_F."""
    w = _orthogonal(512, 512, seed=3)
    fro = gram_error_spectral_bound(w, 0)
    assert gram_error_spectral_bound(w, 2) < 0.25 * fro
    assert gram_error_spectral_bound(w, 2) >= _true_gram_error(w)


@pytest.mark.slow
def test_a_fresh_lipnext_1b_and_2b_pass_the_default_tolerance():
    """Width 4096 (fp64 QR, rounded to fp32): the rigorous bound over the whole path of lipnext-1b (97 matrices)
    and lipnext-2b (193) stays within certify.lipschitz_tol = 1e-4. Fresh square matrices are identically
    distributed, so one stands for each; the stem (3 p^2 -> C, tall) is bounded on its own."""
    spec = get_spec("lipnext-2b")
    width, stem_in = spec.width, 3 * spec.patch_size ** 2
    block = spectral_norm_upper_bound(_orthogonal(width, width, seed=0))
    stem = spectral_norm_upper_bound(_orthogonal(width, stem_in, seed=1))
    for name in ("lipnext-1b", "lipnext-2b"):
        depth = get_spec(name).depth
        assert get_spec(name).width == width
        bound = stem * block ** (3 * depth)  # R twice and M once per block
        assert bound <= 1 + 1e-4, (name, bound)
