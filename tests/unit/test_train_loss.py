"""Margin-aware cross-entropy: closed forms and the certificate it targets."""

import math

import torch
import torch.nn.functional as F

from lipnext_scale.config import LossConfig
from lipnext_scale.train.loss import head_row_distances, margin_cross_entropy, margin_logits


def test_row_distances_match_direct_norms():
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    d = head_row_distances(w)
    for i in range(5):
        for j in range(5):
            want = 0.0 if i == j else float((w[i] - w[j]).norm())
            assert abs(float(d[i, j]) - want) < 1e-5


def test_margin_raises_only_non_target_logits_by_eps_times_row_distance():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    cfg = LossConfig(eps_train=0.5, offset=2.0, temperature=1.0)
    out = margin_logits(logits, torch.tensor([0]), w, cfg)
    expected = torch.tensor([[2.0, 1.0 + 2.0 * 0.5 * math.sqrt(2.0), 0.5 + 2.0 * 0.5 * 1.0]])
    assert torch.allclose(out, expected, atol=1e-5)


def test_zero_eps_and_unit_temperature_is_plain_cross_entropy():
    torch.manual_seed(1)
    logits, labels, w = torch.randn(6, 4), torch.randint(0, 4, (6,)), torch.randn(4, 3)
    loss = margin_cross_entropy(logits, labels, w, LossConfig(eps_train=0.0, offset=1.0, temperature=1.0))
    assert torch.allclose(loss, F.cross_entropy(logits, labels))


def test_loss_is_small_only_when_the_certificate_holds_with_room():
    w = torch.eye(3)  # ||w_y - w_j|| = sqrt(2)
    cfg = LossConfig(eps_train=0.5, offset=1.0, temperature=0.1)
    needed = 0.5 * math.sqrt(2.0)  # margin at which the certificate at eps_train is exactly met
    label = torch.tensor([0])
    losses = [float(margin_cross_entropy(torch.tensor([[m, 0.0, 0.0]]), label, w, cfg))
              for m in (needed - 0.2, needed, needed + 1.0)]
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < 1e-3 and losses[1] > 0.5


def test_gradient_reaches_the_head_through_the_margin_and_bf16_logits_work():
    w = torch.randn(4, 3, requires_grad=True)
    logits = torch.randn(5, 4).bfloat16()
    loss = margin_cross_entropy(logits, torch.randint(0, 4, (5,)), w, LossConfig())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
