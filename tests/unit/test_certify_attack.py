"""l2 PGD against closed forms: on a linear classifier the smallest adversarial l2 perturbation is
known exactly (margin / ||w_y - w_j||), so the attack must fail inside it and succeed beyond it."""

import pytest
import torch

from lipnext_scale.certify.attack import attack_breaks, pgd_l2


def _linear(d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, d, generator=g, dtype=torch.float64)
    return (lambda x: x.flatten(1) @ w.t()), w


def test_iterates_stay_in_the_ball_and_the_box():
    model, _ = _linear()
    x = torch.rand(8, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(8, dtype=torch.long)
    for eps in (0.01, 0.3, 5.0):
        adv = pgd_l2(model, x, y, eps, steps=15)
        assert ((adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-9)).all()
        assert adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(pgd_l2(model, x, y, 0.0), x)



def test_float32_iterates_stay_in_the_ball_after_rounding():
    """Images rounded to float32 after the step: x + delta is not exactly representable, and at small radii
    (a certified radius can be ~1e-3 on a 3x32x32 image) the rounding of 3072 entries near 1 moved the returned
    image out of the ball (found by test_certify_soundness). Distances measured exactly, in float64."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 3 * 32 * 32, generator=g)
    model = lambda x: x.flatten(1) @ w.t()  # noqa: E731
    x = 0.5 + 0.5 * torch.rand(16, 3, 32, 32, generator=g)  # entries in [0.5, 1]: the largest rounding steps
    y = model(x).argmax(1)
    for eps in (1e-4, 1e-3, 1.7e-3, 0.05):
        adv = pgd_l2(model, x, y, eps, steps=10, seed=1)
        assert adv.dtype == torch.float32
        dist = (adv.double() - x.double()).flatten(1).norm(dim=1)
        assert (dist <= eps).all(), (eps, float(dist.max()))
        assert (dist > 0.9 * eps).any()  # the attack still uses (nearly) all of its ball

def test_linear_classifier_breaks_exactly_beyond_the_minimal_perturbation():
    model, w = _linear()
    x = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64)  # the box is far: the l2 ball binds
    logits = model(x)
    y = logits.argmax(1)
    exact = float((logits[0, y] - logits[0, 1 - y]).abs() / (w[0] - w[1]).norm())
    assert exact < 0.4  # the closed form's perturbation stays inside [0, 1]
    assert not attack_breaks(model, x, y, exact * 0.99, steps=20).any()
    assert attack_breaks(model, x, y, exact * 1.01, steps=20).all()


def test_fmn_distances_bracket_the_closed_form_on_a_linear_classifier():
    """Foolbox's minimum-norm attacks find an adversarial point no closer than the exact distance (else
    it would not be adversarial) and, on a linear model, close to it."""
    pytest.importorskip("foolbox")
    from lipnext_scale.certify.attack import fmn_l2_distances

    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 12, generator=g)
    model = lambda x: x.flatten(1) @ w.t()  # noqa: E731
    x = 0.4 + 0.2 * torch.rand(6, 3, 2, 2, generator=g)
    logits = model(x).double()
    y = logits.argmax(1)
    wd = w.double()
    exact = torch.stack([min((logits[i, y[i]] - logits[i, j]) / (wd[y[i]] - wd[j]).norm()
                             for j in range(3) if j != y[i]) for i in range(6)])
    dist = fmn_l2_distances(model, x, y, steps=100)
    assert (dist >= exact * (1 - 1e-4)).all()
    assert (dist[exact < 0.3] <= exact[exact < 0.3] * 1.1).all()  # inside the box the l2 ball binds
    wrong = (y + 1) % 3
    assert (fmn_l2_distances(model, x, wrong, steps=5) == 0).all()  # already misclassified
