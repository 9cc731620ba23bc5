"""Soundness on lipnext-tiny: PGD at the certified radius never changes a certified prediction.

Checked for freshly initialised weights and for weights trained a few steps with the manifold optimizer;
the same attack at a few times the radius does flip predictions, so the check is not vacuous.
"""

import pytest
import torch

from lipnext_scale.certify.attack import pgd_l2
from lipnext_scale.certify.certify import certified_radius, model_pair_distances
from lipnext_scale.config import OptimConfig
from lipnext_scale.model import create_model
from lipnext_scale.model.lipschitz import rigorous_lipschitz_bound


def _trained_tiny(steps: int = 30) -> torch.nn.Module:
    from lipnext_scale.optim import ManifoldOptimizer

    torch.manual_seed(0)
    model = create_model("lipnext-tiny", width=32)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    opt = ManifoldOptimizer(model, OptimConfig(lr=0.2, euclid_lr=1e-2, total_steps=steps))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _check_pgd_never_breaks(model: torch.nn.Module, seed: int) -> None:
    assert rigorous_lipschitz_bound(model) <= 1 + 1e-4
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        pred, _, radius = certified_radius(model(x), model_pair_distances(model))
    labels = pred  # every point is "correct" for its own prediction: certified at any r < radius
    r = (radius * 0.999).to(torch.float32)
    adv = pgd_l2(model, x, labels, r, steps=40, seed=seed)  # each point attacked within its own radius
    assert ((adv.double() - x.double()).flatten(1).norm(dim=1) <= r.double()).all()
    adv_far = pgd_l2(model, x, labels, r * 4 + 0.05, steps=40, seed=seed)
    with torch.no_grad():
        broken_inside = model(adv).argmax(1) != labels
        broken_outside = model(adv_far).argmax(1) != labels
    assert not broken_inside.any(), f"SOUNDNESS: PGD broke certified points {broken_inside.nonzero().flatten()}"
    assert broken_outside.any(), "the attack never succeeds even far outside the radius: it is not testing anything"


@pytest.mark.slow
def test_pgd_never_breaks_certified_points_random_init():
    torch.manual_seed(0)
    _check_pgd_never_breaks(create_model("lipnext-tiny", width=32).eval(), seed=0)


@pytest.mark.slow
def test_pgd_never_breaks_certified_points_after_training():
    _check_pgd_never_breaks(_trained_tiny(), seed=1)
