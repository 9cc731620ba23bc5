"""Every layer is 1-Lipschitz in fp32; shifts and orthogonal projections preserve norms exactly."""

import pytest
import torch

from lipnext_scale.model.layers import (
    BetaAbs, L2SpatialPool, LipNeXtBlock, OrthogonalProjection, Patchify, SpatialShift, orthogonality_error,
)

TOL = 1e-5


def _pairs(shape, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(shape, generator=g)
        # far-apart and close pairs (close ones probe the local slope); not so close that fp32
        # cancellation in f(x) - f(y) dominates the difference being measured
        scale = 10 ** (-2 * torch.rand((), generator=g).item())
        yield x, x + scale * torch.randn(shape, generator=g)


def _assert_lipschitz(layer, shape):
    for x, y in _pairs(shape):
        fx, fy = layer(x), layer(y)
        lhs = (fx - fy).flatten(1).norm(dim=1)
        rhs = (x - y).flatten(1).norm(dim=1)
        assert torch.all(lhs <= rhs * (1 + TOL)), (lhs / rhs).max()


@pytest.mark.parametrize("d_in,d_out", [(16, 16), (16, 48), (48, 16), (12, 64)])
def test_orthogonal_projection_is_semi_orthogonal_and_lipschitz(d_in, d_out):
    torch.manual_seed(0)
    layer = OrthogonalProjection(d_in, d_out)
    assert orthogonality_error(layer.weight) < 1e-5
    _assert_lipschitz(layer, (4, 5, 5, d_in))
    if d_out >= d_in:  # isometry: norms preserved exactly
        x = torch.randn(4, 5, 5, d_in)
        rel = (layer(x).norm() - x.norm()).abs() / x.norm()
        assert rel < TOL


@pytest.mark.parametrize("groups", [1, 3, 5])
def test_circular_shift_is_a_norm_preserving_permutation(groups):
    layer = SpatialShift(groups=groups, mode="circular")
    x = torch.randn(3, 6, 7, 23)
    y = layer(x)
    assert torch.allclose(y.norm(), x.norm(), rtol=TOL)
    # a permutation: the multiset of values is unchanged
    assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)
    _assert_lipschitz(layer, (2, 6, 7, 23))


def test_shift_moves_each_group_one_pixel_in_its_direction():
    layer = SpatialShift(groups=5)
    x = torch.zeros(1, 5, 5, 5)
    x[0, 2, 2, :] = 1.0  # one hot pixel in the centre for every channel
    y = layer(x)
    expected = {0: (2, 2), 1: (2, 3), 2: (2, 1), 3: (3, 2), 4: (1, 2)}
    for c, (h, w) in expected.items():
        assert y[0, h, w, c] == 1.0 and y[0, :, :, c].sum() == 1.0


def test_zero_shift_is_norm_non_increasing():
    layer = SpatialShift(groups=5, mode="zero")
    _assert_lipschitz(layer, (2, 6, 6, 10))
    x = torch.randn(2, 6, 6, 10)
    assert layer(x).norm() <= x.norm() * (1 + TOL)


def test_beta_abs_is_lipschitz_and_norm_preserving():
    for beta in (0.0, 0.25, 0.5, 1.0):
        layer = BetaAbs(beta)
        _assert_lipschitz(layer, (4, 3, 3, 8))
        x = torch.randn(4, 3, 3, 8)
        assert torch.allclose(layer(x).norm(), x.norm(), rtol=TOL)
    y = BetaAbs(0.5)(torch.full((1, 1, 1, 4), -1.0))
    assert y.flatten().tolist() == [1.0, 1.0, -1.0, -1.0]


def test_l2_pool_closed_form_and_lipschitz():
    x = torch.randn(3, 4, 5, 6)
    assert torch.allclose(L2SpatialPool()(x), x.pow(2).sum(dim=(1, 2)).sqrt(), rtol=1e-6)
    _assert_lipschitz(L2SpatialPool(), (3, 4, 5, 6))


def test_patchify_is_a_permutation():
    x = torch.randn(2, 3, 8, 8)
    y = Patchify(4)(x)
    assert y.shape == (2, 2, 2, 48)
    assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)
    assert torch.equal(y[0, 0, 0].view(3, 4, 4), x[0, :, :4, :4])


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_block_is_lipschitz(alpha):
    torch.manual_seed(1)
    block = LipNeXtBlock(width=20, expansion=2, beta=0.5, shift_groups=5, shift_mode="circular",
                         residual_alpha=alpha)
    _assert_lipschitz(block, (2, 4, 4, 20))


def test_bad_layer_arguments_are_named():
    with pytest.raises(ValueError, match="groups=9"):
        SpatialShift(groups=9)
    with pytest.raises(ValueError, match="beta=1.5"):
        BetaAbs(1.5)
    with pytest.raises(ValueError, match="mode='reflect'"):
        SpatialShift(mode="reflect")
