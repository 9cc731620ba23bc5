"""The Newton-Schulz polar retraction (the heavy-ball ablation): land on the manifold, agree with the tangent to first order, fp32 math for bf16 inputs."""

import pytest
import torch

from lipnext_scale.optim import (
    orthogonality_error, orthogonalize_exact, polar_newton_schulz, retract, riemannian_grad,
)

SHAPES = [(32, 32), (48, 16), (16, 48)]  # orthogonal, isometry (tall), co-isometry (wide)


def _point_and_step(shape, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=gen))[0]
    x = x if shape[0] >= shape[1] else x.mT.contiguous()
    d = riemannian_grad(x, torch.randn(shape, generator=gen))
    return x, scale * d / d.norm()


@pytest.mark.parametrize("method", ["polar_ns"])
@pytest.mark.parametrize("shape", SHAPES)
def test_retraction_lands_on_manifold_and_is_first_order(method, shape):
    x, d = _point_and_step(shape, 0.5)
    y = retract(x, method, tangent=d)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert orthogonality_error(y) < 2e-6
    # R_x(t d) = x + t d + O(t^2): the retraction's derivative at 0 is the identity on the tangent space
    errs = [float((retract(x, method, tangent=t * d) - x - t * d).abs().max()) for t in (1e-1, 5e-2)]
    assert errs[1] < 0.35 * errs[0]


@pytest.mark.parametrize("method", ["polar_ns"])
def test_zero_step_is_identity(method):
    x, d = _point_and_step((24, 8), 0.0)
    assert torch.allclose(retract(x, method, tangent=d), x, atol=1e-6)


@pytest.mark.parametrize("method", ["polar_ns"])
def test_bf16_input_is_upcast_to_fp32(method):
    x, d = _point_and_step((32, 32), 0.3)
    y = retract(x.bfloat16(), method, tangent=d.bfloat16())
    assert y.dtype == torch.float32
    assert orthogonality_error(y) < 2e-6


def test_polar_ns_matches_svd_polar_factor():
    x, d = _point_and_step((40, 20), 0.4)
    stats = {}
    y = polar_newton_schulz(x + d, iters=6, stats=stats)
    assert torch.allclose(y, orthogonalize_exact(x + d), atol=2e-6)
    assert stats.get("ns_fallbacks", 0) == 0


def test_polar_ns_outside_convergence_region_falls_back_and_counts():
    x, d = _point_and_step((32, 32), 3.0)  # singular values up to sqrt(1 + 9) > sqrt(3)
    stats = {}
    y = polar_newton_schulz(x + d, iters=6, stats=stats)
    assert stats["ns_fallbacks"] == 1
    assert orthogonality_error(y) < 2e-6


def test_polar_ns_too_few_iterations_falls_back():
    # Singular values 1.6 and 1 (Gram diag(2.56, 1, ...): inside NS's region, so the spectrum guard passes).
    # NS maps 1.6 -> 0.352 -> 0.506 -> 0.694 -> 0.874: iters=1 (at most 3 * 1 + 1 iterations) ends far from
    # orthogonal and must fall back to QR, counted; the default budget converges without a fallback.
    q = torch.linalg.qr(torch.randn(48, 16, generator=torch.Generator().manual_seed(0)))[0]
    y0 = q * torch.tensor([1.6] + [1.0] * 15)
    stats = {}
    y = polar_newton_schulz(y0, iters=1, stats=stats)
    assert stats.get("ns_fallbacks") == 1, stats
    assert "after" in stats["ns_fallback_reason"], stats  # the iteration budget, not the spectrum guard
    assert orthogonality_error(y) < 2e-6  # never a silently non-orthogonal result
    assert torch.allclose(y, orthogonalize_exact(y0), atol=2e-6)  # the fallback is the polar factor too
    enough = {}
    polar_newton_schulz(y0, iters=6, stats=enough)
    assert enough.get("ns_fallbacks", 0) == 0 and enough["ns_iters"] > 4, enough


def test_exact_reorthogonalisation_removes_drift():
    x, _ = _point_and_step((64, 32), 0.0)
    drifted = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert orthogonality_error(drifted) > 1e-4
    assert orthogonality_error(orthogonalize_exact(drifted)) < 1e-6


def test_unknown_method_and_bad_shapes_are_clear_errors():
    x, d = _point_and_step((8, 8), 0.1)
    with pytest.raises(ValueError, match="unknown retraction 'svd'"):
        retract(x, "svd", tangent=d)
    with pytest.raises(ValueError, match="expected a matrix"):
        retract(torch.ones(3, 3, 3), "polar_ns")
    with pytest.raises(ValueError, match="tangent shape"):
        retract(x, "polar_ns", tangent=torch.zeros(8, 4))
