"""Every layer is 1-Lipschitz in fp32; shifts and orthogonal projections preserve norms exactly."""

import pytest
import torch

from lipnext_scale.model.layers import (
    BetaAbs, L2SpatialPool, LipNeXtBlock, NormalizedLinear, OrthogonalProjection, Patchify,
    SpatialShift, orthogonality_error, shift_group_size, shift_reference,
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


@pytest.mark.parametrize("alpha,channels", [(0.125, 64), (0.0625, 256), (0.25, 23), (0.125, 20)])
def test_circular_shift_is_a_norm_preserving_permutation(alpha, channels):
    layer = SpatialShift(alpha, mode="circular")
    x = torch.randn(3, 6, 7, channels)
    y = layer(x)
    assert torch.allclose(y.norm(), x.norm(), rtol=TOL)
    # a permutation: the multiset of values is unchanged
    assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)
    _assert_lipschitz(layer, (2, 6, 7, channels))


def test_shift_group_sizes_are_alpha_c_in_multiples_of_8():
    assert shift_group_size(1024, 1 / 8) == 128 and shift_group_size(1024, 1 / 16) == 64
    assert shift_group_size(100, 1 / 8) == 8  # 12 -> 8: aligned
    assert shift_group_size(20, 1 / 8) == 2  # fewer than 8: kept as is
    assert shift_group_size(20, 0.2, align=1) == 4


def test_shift_moves_each_group_one_pixel_in_its_direction():
    """alpha C channels up, down, left, right, the rest unshifted (paper.md A)."""
    layer = SpatialShift(alpha=0.125)
    x = torch.zeros(1, 5, 5, 16)
    x[0, 2, 2, :] = 1.0  # one hot pixel in the centre for every channel
    y = layer(x)
    expected = {0: (1, 2), 1: (1, 2), 2: (3, 2), 4: (2, 1), 6: (2, 3), 8: (2, 2), 15: (2, 2)}
    for c, (h, w) in expected.items():  # 2 channels per direction: up, down, left, right, then 8 still
        assert y[0, h, w, c] == 1.0 and y[0, :, :, c].sum() == 1.0


def test_one_pass_shift_equals_the_roll_definition_and_its_adjoint():
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    for mode in ("circular", "zero"):
        layer = SpatialShift(0.125, mode, align=1)
        assert torch.equal(layer(x), shift_reference(x, 2, circular=mode == "circular"))
        assert torch.autograd.gradcheck(layer, (x,), check_forward_ad=True)


def test_zero_shift_is_norm_non_increasing():
    layer = SpatialShift(0.25, mode="zero")
    _assert_lipschitz(layer, (2, 6, 6, 12))
    x = torch.randn(2, 6, 6, 12)
    assert layer(x).norm() <= x.norm() * (1 + TOL)


def test_beta_abs_is_lipschitz_and_norm_preserving():
    for beta in (0.0, 0.25, 0.5, 1.0):
        layer = BetaAbs(beta)
        _assert_lipschitz(layer, (4, 3, 3, 8))
        x = torch.randn(4, 3, 3, 8)
        assert torch.allclose(layer(x).norm(), x.norm(), rtol=TOL)
    y = BetaAbs(0.5)(torch.full((1, 1, 1, 4), -1.0))
    assert y.flatten().tolist() == [1.0, 1.0, -1.0, -1.0]
    x = torch.randn(2, 3, 3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BetaAbs(0.5), (x,), check_forward_ad=True)
    assert torch.equal(BetaAbs(0.5)(x), torch.cat([x[..., :8].abs(), x[..., 8:]], dim=-1))


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


def _paper_block(width=32, grid=4, **kw):
    block = LipNeXtBlock(width, grid, **kw)
    with torch.no_grad():  # non-trivial translations: p and b must not break the bound
        if block.pos is not None:
            block.pos.normal_()
        block.bias.normal_()
    return block


@pytest.mark.parametrize("kw", [{}, {"positional": False}, {"alpha": 1 / 16, "beta": 0.25}, {"shift_mode": "zero"}])
def test_paper_block_is_lipschitz(kw):
    torch.manual_seed(1)
    _assert_lipschitz(_paper_block(**kw), (2, 4, 4, 32))


def test_paper_block_is_the_formula_with_orthogonal_r_and_m():
    """Z = beta_Abs(M R^T S(R(X + p)) + b), R and M square orthogonal, p of shape (H, W, 1)."""
    torch.manual_seed(2)
    block = _paper_block(width=32, grid=4)
    assert block.rot.shape == block.mix.shape == (32, 32) and block.pos.shape == (4, 4, 1)
    assert orthogonality_error(block.rot) < 1e-5 and orthogonality_error(block.mix) < 1e-5
    x = torch.randn(3, 4, 4, 32, dtype=torch.float64)
    block = block.double()
    r, m = block.rot, block.mix
    u = shift_reference((x + block.pos) @ r.t(), 4)  # R(X + p), then S (alpha C = 4 channels per direction)
    z = u @ r @ m.t() + block.bias  # M R^T u + b, channels-last
    expected = torch.cat([z[..., :16].abs(), z[..., 16:]], dim=-1)
    assert torch.allclose(block(x), expected, atol=1e-12)
    # without the nonlinearity the block is a translation of an orthogonal map: norms of differences kept
    y = torch.randn(3, 4, 4, 32, dtype=torch.float64)
    lin = lambda t: shift_reference((t + block.pos) @ r.t(), 4) @ r @ m.t() + block.bias
    assert torch.allclose((lin(x) - lin(y)).norm(), (x - y).norm(), rtol=1e-6)  # R, M orthogonal to fp32 init


def test_normalized_head_uses_unit_rows():
    torch.manual_seed(0)
    head = NormalizedLinear(8, 5)
    with torch.no_grad():
        head.direction.mul_(torch.arange(1.0, 6.0)[:, None])  # rows of very different norms
        head.bias.normal_()
    rows = head.rows()
    assert torch.allclose(rows.norm(dim=1), torch.ones(5), atol=1e-6)
    x = torch.randn(4, 8)
    assert torch.allclose(head(x), x @ rows.t() + head.bias, atol=1e-6)
    assert not hasattr(head, "weight")  # only rows() are the head's weights: nothing raw to certify with


def test_bad_layer_arguments_are_named():
    with pytest.raises(ValueError, match="alpha=0.5"):
        SpatialShift(alpha=0.5)
    with pytest.raises(ValueError, match="beta=1.5"):
        BetaAbs(1.5)
    with pytest.raises(ValueError, match="mode='reflect'"):
        SpatialShift(mode="reflect")
