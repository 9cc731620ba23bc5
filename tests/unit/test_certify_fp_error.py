"""Floating-point allowances: the stated feature-error bound against fp32-vs-float64 measurements, and
the two floating-point attacks on certificates (issue 15), rebuilt here, refused or certified soundly."""

import copy
import math

import pytest
import torch

from lipnext_scale.certify.attack import pgd_l2
from lipnext_scale.certify.certify import certified_radius, head_pair_distances, model_pair_distances
from lipnext_scale.certify.fp_error import (
    U32, float_error_model, gamma, input_norm_bound, matmul_error,
)
from lipnext_scale.certify.worker import Checks, certify_batch, features_and_norms
from lipnext_scale.model import create_model


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model("lipnext-tiny", **kw).eval()
    with torch.no_grad():  # trained models have non-zero biases and positional encodings
        for block in model.blocks:
            block.bias.normal_(0, 0.05)
            block.pos.normal_(0, 0.1)
    return model.requires_grad_(False)


def _inputs(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    # random, constant extremes (largest ||x - mean||) and a smooth image
    smooth = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(2, 3, 32, 32)
    return torch.cat([torch.rand(n, 3, 32, 32, generator=g), torch.ones(2, 3, 32, 32), torch.zeros(2, 3, 32, 32),
                      smooth])


def test_closed_forms():
    assert gamma(10, 2.0 ** -24) == pytest.approx(10 * 2.0 ** -24, rel=1e-6)
    assert gamma(2 ** 25, 2.0 ** -24) == math.inf
    assert matmul_error(63, 2.0, safety=1.0) == pytest.approx(U32 * 8 * 2.0)
    assert input_norm_bound((0.5, 0.5, 0.5), 32) == pytest.approx(0.5 * math.sqrt(3 * 32 * 32))
    assert input_norm_bound((0.25, 0.5, 0.5), 2) == pytest.approx(math.sqrt(4 * (0.75 ** 2 + 0.25 + 0.25)))


@pytest.mark.parametrize("kw", [{}, {"width": 128, "depth": 4, "patch_size": 2}])
def test_stated_feature_error_bound_covers_the_measured_error(kw):
    model = _model(**kw)
    x = _inputs()
    fem = float_error_model(model, 1.0)
    features, norms = features_and_norms(model, x)
    with torch.no_grad():
        exact = copy.deepcopy(model).double().features(x.double())
    measured = (features.double() - exact).norm(dim=1)
    input_norm = (x.double() - 0.5).flatten(1).norm(dim=1)
    bound = fem.feature_error(input_norm, norms, features.double().norm(dim=1))
    assert (measured <= 0.1 * bound).all(), (measured / bound).max()  # ~1/100 measured: a margin beyond SAFETY
    uniform_e, phi = fem.uniform()
    assert (bound <= uniform_e).all() and (exact.norm(dim=1) <= phi).all()


def _old_radius(model, x):
    """The certificate before issue 15: float64 differences of fp32 logits, no allowance."""
    with torch.no_grad():
        return certified_radius(model(x).double(), model_pair_distances(model))


def _pgd_flips(model, x, labels, radius, factor=0.999, steps=40):
    """(B,) bool: PGD within factor x radius changes the fp32 prediction (points with radius > 0)."""
    flips = torch.zeros(len(x), dtype=torch.bool)
    for i in torch.nonzero(torch.isfinite(radius) & (radius > 0)).flatten().tolist():
        r = float(radius[i]) * factor
        adv = pgd_l2(model, x[i:i + 1], labels[i:i + 1], r, steps=steps, seed=i)
        with torch.no_grad():
            flips[i] = bool(model(adv).argmax(1) != labels[i])
    return flips


def test_a_huge_common_head_bias_is_refused():
    """Adding 2^20 to every head bias changes nothing in exact arithmetic but quantises fp32 logits to
    1/8: the old certificate trusted those logits and PGD breaks it; ours certifies nothing (the fp32
    head's rounding now dwarfs every gap), and where its radius is positive PGD does not get inside."""
    model = _model(width=32, depth=2)
    with torch.no_grad():
        model.head.direction.mul_(3.0)  # (normalised away) and spread the logits
        model.head.bias.add_(2.0 ** 20)
    x = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pred_old, _, radius_old = _old_radius(model, x)
    assert (radius_old > 0).any()
    broken_old = _pgd_flips(model, x, pred_old, radius_old)
    assert broken_old.any(), "the attack is not reproduced: old certificates were not broken"

    out = certify_batch(model, x, pred_old, Checks([0.0]), lipschitz=1.0)
    assert not out["certified@0"].any()  # refused: no radius survives the allowance
    assert (out["radius"] < 0).all()
    assert (out["radius_exact_arithmetic"] > 0).any()  # ... which is what exact arithmetic would claim


def test_identical_rows_with_a_tiny_bias_gap_are_refused_and_a_real_gap_certified():
    model = _model(width=32, depth=2)
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    far = torch.full((1, 3, 32, 32), 0.8)  # a second input, within the old radius of x[0]
    with torch.no_grad():
        phi_x, phi_far = model.features(x[:1])[0], model.features(far)[0]
        row = phi_far - (phi_far @ phi_x) / (phi_x @ phi_x) * phi_x  # logit ~0 at x[0], large at `far`
        model.head.direction[0] = row
        model.head.direction[1] = row
        model.head.bias.fill_(-50.0)  # the other classes never win
        model.head.bias[0] = 0.0
        model.head.bias[1] = 1e-7  # exact arithmetic: class 1 always beats class 0, by 1e-7
    assert head_pair_distances(model.head.rows())[0, 1] == 0
    pred_old, _, radius_old = _old_radius(model, x[:1])
    # near 0 fp32 resolves 1e-7: the old certificate saw class 1 ahead of an identical row (a ratio of
    # inf) and certified it up to the other classes. At `far` the logits are large, fp32 rounds the
    # 1e-7 away, the tie goes to class 0: a false certificate.
    with torch.no_grad():
        assert int(pred_old) == 1 and float(radius_old) > float((far - x[:1]).norm())
        assert int(model(far).argmax(1)) == 0
    out = certify_batch(model, torch.cat([x, far]), torch.ones(len(x) + 1, dtype=torch.long), Checks([0.0]),
                        lipschitz=1.0)
    assert (out["prediction"] == 1).all()
    assert not out["certified@0"].any() and (out["radius"] == -math.inf).all()

    with torch.no_grad():
        model.head.bias[1] = 1.0  # a gap of 1: identical rows can never swap, certified soundly
    out = certify_batch(model, x, torch.ones(24, dtype=torch.long), Checks([0.0]), lipschitz=1.0)
    assert (out["prediction"] == 1).all() and out["certified@0"].all()
    certified = out["certified@0"]
    radius = torch.where(certified, out["radius"], torch.zeros_like(out["radius"]))
    assert not _pgd_flips(model, x, out["prediction"], radius).any()


def test_pgd_never_breaks_the_allowed_radius_of_a_normal_model():
    model = _model(width=32, depth=2)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = certify_batch(model, x, torch.zeros(16, dtype=torch.long), Checks([]), lipschitz=1.0)
    assert (out["radius"] > 0).any()
    assert not _pgd_flips(model, x, out["prediction"], out["radius"]).any()
    # the allowance is small: an absolute 3e-4 here, well under 1% of any radius that is not a near-tie (a random
    # untrained head can put an input within a few 1e-3 of its decision boundary)
    allowance, exact = out["radius_exact_arithmetic"] - out["radius"], out["radius_exact_arithmetic"]
    assert (allowance < 1e-3).all() and (allowance >= 0).all()
    assert (allowance[exact > 0.03] < 0.01 * exact[exact > 0.03]).all()
