"""Certified-training losses: EMMA and the margin loss against closed forms, and the eps ramp."""

import math

import pytest
import torch
import torch.nn.functional as F

from lipnext_scale.config import ConfigError, LossConfig
from lipnext_scale.train.loss import certified_loss, emma_logits, head_row_distances, margin_logits, training_eps

MARGIN = LossConfig(kind="margin")


def test_row_distances_match_direct_norms():
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    d = head_row_distances(w)
    for i in range(5):
        for j in range(5):
            want = 0.0 if i == j else float((w[i] - w[j]).norm())
            assert abs(float(d[i, j]) - want) < 1e-5


def test_emma_matches_its_closed_form_per_class():
    """Non-target j raised by eps_j ||w_y - w_j||, eps_j = clamp((f_y - f_j) / ||w_y - w_j||, 0.01 eps, eps)."""
    w = torch.eye(3)  # ||w_y - w_j|| = sqrt(2)
    eps, r2 = 0.5, math.sqrt(2.0)
    logits = torch.tensor([[2.0, 1.9, -3.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0])
    out = emma_logits(logits, labels, w, eps)
    # sample 0: gap 0.1 -> eps_j = 0.1 / r2 (inside the clamp); gap 5 -> eps_j = eps (clamped above)
    # sample 1: gap -1 (misclassified) -> eps_j = 0.01 eps (clamped below); gap 0 -> 0.01 eps too
    expected = torch.tensor([[2.0, 1.9 + 0.1, -3.0 + eps * r2],
                             [0.0, 1.0 + 0.01 * eps * r2, 0.0 + 0.01 * eps * r2]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_emma_eps_j_carries_no_gradient():
    w = torch.eye(3)
    logits = torch.tensor([[2.0, 1.9, -3.0]], requires_grad=True)
    emma_logits(logits, torch.tensor([0]), w, 0.5).sum().backward()
    # with eps_j detached, d(raised_j)/d(f) is the identity: every logit's gradient is exactly 1
    assert torch.equal(logits.grad, torch.ones_like(logits))


def test_margin_raises_only_non_target_logits_by_eps_times_row_distance():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    cfg = LossConfig(kind="margin", offset=2.0, temperature=1.0)
    out = margin_logits(logits, torch.tensor([0]), w, 0.5, cfg)
    expected = torch.tensor([[2.0, 1.0 + 2.0 * 0.5 * math.sqrt(2.0), 0.5 + 2.0 * 0.5 * 1.0]])
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(kind="margin", temperature=1.0)])
def test_zero_eps_is_plain_cross_entropy(cfg):
    torch.manual_seed(1)
    logits, labels, w = torch.randn(6, 4), torch.randint(0, 4, (6,)), torch.randn(4, 3)
    assert torch.allclose(certified_loss(logits, labels, w, 0.0, cfg), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(kind="margin", temperature=0.1)])
def test_loss_falls_as_the_certified_margin_grows(cfg):
    w = torch.eye(3)  # ||w_y - w_j|| = sqrt(2)
    needed = 0.5 * math.sqrt(2.0)  # margin at which the certificate at eps = 0.5 is exactly met
    label = torch.tensor([0])
    losses = [float(certified_loss(torch.tensor([[m, 0.0, 0.0]]), label, w, 0.5, cfg))
              for m in (needed - 0.2, needed, needed + 1.0, needed + 10.0)]
    # EMMA is flat (log C) while the certificate fails (each eps_j is then the current gap, detached):
    # its value stops falling there, its gradient does not (see test_emma_eps_j_carries_no_gradient)
    assert losses[0] >= losses[1] > losses[2] > losses[3]
    assert losses[3] < 1e-3


def test_gradient_reaches_the_head_and_bf16_logits_work():
    for cfg in (LossConfig(), MARGIN):
        w = torch.randn(4, 3, requires_grad=True)
        logits = torch.randn(5, 4).bfloat16()
        loss = certified_loss(logits, torch.randint(0, 4, (5,)), w, 0.3, cfg)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_eps_ramp_is_liresnet_plus_plus():
    """0.1 x eps at step 0, linearly to 3 x eps at half of training, then held."""
    cfg = LossConfig(eps=0.2)
    assert training_eps(0, 1000, cfg) == pytest.approx(0.02)
    assert training_eps(250, 1000, cfg) == pytest.approx(0.2 * (0.1 + 2.9 * 0.5))
    assert training_eps(500, 1000, cfg) == pytest.approx(0.6)
    assert training_eps(999, 1000, cfg) == pytest.approx(0.6)
    flat = LossConfig(eps=0.2, eps_ramp_start=1.0, eps_ramp_end=1.0)
    assert training_eps(0, 10, flat) == training_eps(9, 10, flat) == pytest.approx(0.2)
    assert training_eps(0, 10, LossConfig(eps=0.2, eps_ramp_fraction=0.0)) == pytest.approx(0.6)


@pytest.mark.parametrize("kw,match", [({"kind": "trades"}, "loss.kind"), ({"eps": float("nan")}, "loss.eps"),
                                      ({"eps_ramp_fraction": 1.5}, "eps_ramp_fraction"),
                                      ({"temperature": 0.0}, "temperature")])
def test_bad_loss_config_is_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**kw).validate()
