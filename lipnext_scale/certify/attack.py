"""Attacks that check certificates empirically: l2 PGD (ours, pure torch) and l2 FMN (Foolbox's).

A certificate says no input within the radius changes the prediction; an attack that finds one inside
it is a SOUNDNESS ALARM. FMN (Pintor et al. 2021, "Fast Minimum-norm Adversarial Attacks", as
implemented by Foolbox 3.3, an optional extra: `pip install lipnext_scale[attack]`) is independent
of our code and minimum-norm. Foolbox's FMN keeps its first adversarial point when the step size (max 1
by default) is large against the radii (we saw 1.5x the radius whatever the step count), so
`--attack fmn` runs Foolbox's FMN-l2 and DDN (Rony et al. 2019, the same library) and keeps the
smaller distance per point. One run per point gives the smallest adversarial distance found,
hence an empirical robust accuracy at every eps (an upper bound on the true robust accuracy, as CRA is
a lower bound) and distance / radius for every certified point (must stay > 1).

PGD:

It maximises the margin loss max_{j != y} f_j - f_y (a Carlini-Wagner style objective: it keeps pushing
once the label flips less than cross-entropy does not) inside the l2 ball of radius eps around x,
intersected with the [0, 1] pixel box. Steps follow the normalised gradient; each iterate is projected
back onto the ball, then clipped to the box (clipping moves a point towards x coordinate-wise in the
ball's direction, so it never leaves the ball). The best (most adversarial) iterate is kept.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def _margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{j != y} f_j - f_y per sample: > 0 iff the prediction is not y."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.max(dim=1).values - true


def _project_l2(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """delta scaled onto the l2 ball of radius eps ((B,) per sample) where it lies outside it."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def _inner_radius(x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """(B,) radii, in x's dtype, inside which every iterate stays within eps after rounding to x's dtype.

    x + delta is rounded to x's dtype, each entry (in [0, 1]) by at most half an ulp of 1: at most
    sqrt(n) * u / 2 in l2 over n entries (u = finfo.eps). The projection itself (a norm, a quotient, a product)
    and the cast of the radius are off by a few u relative. The radius is shrunk by twice the first and 8 u
    relative for the rest: at a float32 certified radius of 1e-3 on a 3x32x32 image, 0.3 % of it."""
    u = torch.finfo(x.dtype).eps
    inner = torch.as_tensor(eps, dtype=torch.float64) * (1 - 8 * u) - math.sqrt(x[0].numel()) * u
    return inner.clamp_min(0).to(x.dtype).expand(x.shape[0]).to(x.device)


def pgd_l2(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
           eps: float | torch.Tensor, *, steps: int = 10, step_size: float | None = None, seed: int = 0
           ) -> torch.Tensor:
    """Adversarial images within ||x_adv - x||_2 <= eps (and in [0, 1]) that try to change `model`'s
    prediction away from `labels`, from a random start inside the ball (seeded). `eps` is one radius or one
    per sample ((B,)). Returns the best iterate per sample.

    The ball holds for the returned images as stored, not only for the real-valued iterates: iterates are
    projected onto a slightly smaller ball that absorbs the rounding (_inner_radius)."""
    x = x.detach()
    if not torch.is_tensor(eps) and eps <= 0:
        return x.clone()
    shape = (-1, *([1] * (x.dim() - 1)))
    radius = _inner_radius(x, eps)
    step = (2.5 * radius / steps).view(shape) if step_size is None else step_size
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    delta = _project_l2(noise * (radius / 4).view(shape) / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape),
                        radius)
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
            g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            delta = _project_l2(delta + step * grad / g_norm, radius)
            delta = (x + delta).clamp(0, 1) - x
    return best.detach()


def attack_breaks(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                  eps: float | torch.Tensor, **pgd_kwargs) -> torch.Tensor:
    """(B,) bool: PGD at eps found an input whose prediction differs from `labels`."""
    x_adv = pgd_l2(model, x, labels, eps, **pgd_kwargs)
    with torch.no_grad():
        return model(x_adv).argmax(dim=1) != labels


FOOLBOX_MISSING = ("--attack fmn needs Foolbox 3.3 (an optional extra): pip install 'lipnext_scale[attack]' "
                   "or pip install 'foolbox>=3.3,<3.4'")


def require_foolbox():
    """The foolbox module, or an ImportError that says how to install it."""
    try:
        import foolbox
    except ImportError:
        raise ImportError(FOOLBOX_MISSING) from None
    return foolbox


class _AsModule(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def fmn_l2_distances(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor, *,
                     steps: int = 100) -> torch.Tensor:
    """(B,) float64: the smallest l2 distance of an adversarial example found by Foolbox's FMN-l2 or DDN
    for each point (inf where neither finds one). Foolbox's success flags are not trusted: each
    candidate is re-run through `model` here, the distance measured here in float64. A point `model`
    already misclassifies gets distance 0."""
    fb = require_foolbox()
    x = x.detach().to(torch.float32)
    labels = labels.to(x.device)
    with torch.no_grad():
        wrong = model(x).argmax(1) != labels
    out = torch.full((x.shape[0],), torch.inf, dtype=torch.float64)
    out[wrong.cpu()] = 0.0
    todo = (~wrong).nonzero().squeeze(1)
    if todo.numel() == 0:
        return out
    module = model if isinstance(model, torch.nn.Module) else _AsModule(model)  # Foolbox takes Modules only
    fmodel = fb.PyTorchModel(module.eval(), bounds=(0.0, 1.0), device=x.device)
    xs, ys = x[todo], labels[todo]
    best = torch.full((len(todo),), torch.inf, dtype=torch.float64)
    for attack in (fb.attacks.L2FMNAttack(steps=steps), fb.attacks.DDNAttack(steps=steps)):
        with torch.enable_grad():
            adv, _, _ = attack(fmodel, xs, ys, epsilons=None)
        adv = adv.detach().clamp(0.0, 1.0)
        with torch.no_grad():
            flipped = (model(adv).argmax(1) != ys).cpu()
        dist = (adv.double() - xs.double()).flatten(1).norm(dim=1).cpu()
        best = torch.minimum(best, torch.where(flipped, dist, torch.full_like(dist, torch.inf)))
    out[todo.cpu()] = best
    return out
