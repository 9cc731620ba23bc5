"""An l2 PGD attack (pure torch): the empirical check that no certified point can be broken.

It maximises the margin loss max_{j != y} f_j - f_y (a Carlini-Wagner style objective: it keeps pushing
once the label flips less than cross-entropy does not) inside the l2 ball of radius eps around x,
intersected with the [0, 1] pixel box. Steps follow the normalised gradient; each iterate is projected
back onto the ball, then clipped to the box (clipping moves a point towards x coordinate-wise in the
ball's direction, so it never leaves the ball). The best (most adversarial) iterate is kept.
"""

from __future__ import annotations

from typing import Callable

import torch


def _margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{j != y} f_j - f_y per sample: > 0 iff the prediction is not y."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.max(dim=1).values - true


def _project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def pgd_l2(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor, eps: float,
           *, steps: int = 10, step_size: float | None = None, random_start: bool = True,
           seed: int = 0) -> torch.Tensor:
    """Adversarial images within ||x_adv - x||_2 <= eps (and in [0, 1]) that try to change `model`'s
    prediction away from `labels`. Returns the best iterate per sample."""
    if eps <= 0:
        return x.detach().clone()
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if random_start:
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        delta = _project_l2(noise * (eps / 4) / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1),
                            eps)
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x)
    best = x.clone()
    best_loss = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
    for _ in range(steps + 1):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = _margin_loss(model(x + delta), labels)
            (grad,) = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            improved = loss > best_loss
            best[improved] = (x + delta)[improved]
            best_loss = torch.where(improved, loss, best_loss)
            g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            delta = _project_l2(delta + step_size * grad / g_norm, eps)
            delta = (x + delta).clamp(0, 1) - x
    return best.detach()


def attack_breaks(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                  eps: float, **pgd_kwargs) -> torch.Tensor:
    """(B,) bool: PGD at eps found an input whose prediction differs from `labels`."""
    x_adv = pgd_l2(model, x, labels, eps, **pgd_kwargs)
    with torch.no_grad():
        return model(x_adv).argmax(dim=1) != labels
