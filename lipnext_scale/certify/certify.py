"""Certification math: pure functions over logits (paper.md B.1), in float64.

For a 1-Lipschitz feature map phi and a linear head f_j = w_j . phi(x) + b_j, the logit gap
f_y - f_j changes by at most ||w_y - w_j|| * ||delta|| under an input perturbation delta, so the
prediction y cannot change within radius

    R(x) = min_{j != y} (f_y - f_j) / (L * ||w_y - w_j||)

where L bounds the feature map's Lipschitz constant (1 by construction; the rigorous bound of
`model.lipschitz` when weights are only approximately orthogonal). Without a head we use the generic
bound for an L-Lipschitz logit map: (top1 - top2) / (sqrt(2) L). A point is certified at eps iff it is
correctly classified and R > eps (strict: at R == eps a tie is reachable).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

DEFAULT_EPS = "36/255,72/255,108/255"


class CertifyInputError(ValueError):
    """Input to the certification math is unusable; the message names the value and the allowed range."""


def parse_eps(text: str) -> float:
    """'36/255' -> 0.1411..., '0.5' -> 0.5. No eval: a fraction or a decimal, >= 0 and finite."""
    s = str(text).strip()
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError) as e:
        reason = "division by zero" if isinstance(e, ZeroDivisionError) else "not a number or fraction"
        raise CertifyInputError(
            f"eps {s!r}: {reason}; give a non-negative number or fraction such as 36/255 or 0.5") from None
    if value < 0:
        raise CertifyInputError(f"eps {s!r} is negative; eps must be >= 0 (e.g. 36/255)")
    return float(value)


def parse_eps_list(text: str | list | tuple) -> list[float]:
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [str(i).strip() for i in items if str(i).strip()]
    if not items:
        raise CertifyInputError(f"eps list {text!r} is empty; give e.g. {DEFAULT_EPS}")
    return [parse_eps(i) for i in items]


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise CertifyInputError(f"logits of shape {tuple(logits.shape)}: expected (batch, classes >= 2)")
    logits = logits.detach().to(torch.float64)
    if not torch.isfinite(logits).all():
        raise CertifyInputError("logits contain NaN or inf; check the input images (finite values in [0, 1]) "
                                "and the checkpoint's weights")
    return logits


def head_pair_distances(head_weight: torch.Tensor) -> torch.Tensor:
    """(C, C) matrix of ||w_i - w_j||_2 in float64, by direct differences (no Gram-matrix cancellation,
    which could under-estimate a small distance and so over-state a radius)."""
    w = head_weight.detach().to(torch.float64)
    return torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")


def certified_radius(logits: torch.Tensor, pair_distances: torch.Tensor | None = None,
                     lipschitz: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (prediction, margin, radius), all from float64 logits.

    `pair_distances`: from `head_pair_distances(model.head.weight)` when the logits are a linear head on
    L-Lipschitz features; None for a generic L-Lipschitz logit map (radius = margin / (sqrt(2) L)).
    `margin` is top1 - top2 of the raw logits.
    """
    if not (lipschitz > 0 and math.isfinite(lipschitz)):
        raise CertifyInputError(f"lipschitz={lipschitz}: must be a finite number > 0")
    logits = _check_logits(logits)
    top2 = logits.topk(2, dim=1)
    pred = top2.indices[:, 0]
    margin = top2.values[:, 0] - top2.values[:, 1]
    if pair_distances is None:
        radius = margin / (math.sqrt(2.0) * lipschitz)
        return pred, margin, radius
    c = logits.shape[1]
    if pair_distances.shape != (c, c):
        raise CertifyInputError(f"pair_distances of shape {tuple(pair_distances.shape)} do not match "
                                f"{c} classes")
    gaps = logits.gather(1, pred[:, None]) - logits  # f_pred - f_j >= 0
    dists = pair_distances.to(torch.float64)[pred]
    ratio = torch.where(dists > 0, gaps / dists.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.where(gaps > 0, torch.inf, 0.0))  # identical rows: the gap never moves
    ratio.scatter_(1, pred[:, None], torch.inf)  # j == pred does not constrain
    radius = ratio.min(dim=1).values / lipschitz
    return pred, margin, radius


def certified_mask(pred: torch.Tensor, radius: torch.Tensor, labels: torch.Tensor,
                   eps_list: list[float]) -> torch.Tensor:
    """(B, len(eps)) bool: correct and radius > eps."""
    correct = pred == labels.to(pred.device)
    eps = torch.tensor(eps_list, dtype=torch.float64, device=radius.device)
    return correct[:, None] & (radius[:, None] > eps[None, :])


def certified_accuracy(pred: torch.Tensor, radius: torch.Tensor, labels: torch.Tensor,
                       eps_list: list[float]) -> dict[str, float]:
    """{"clean": acc, "<eps>": CRA, ...} as fractions in [0, 1]."""
    if labels.numel() == 0:
        raise CertifyInputError("no samples to certify")
    mask = certified_mask(pred, radius, labels, eps_list)
    out = {"clean": float((pred == labels.to(pred.device)).double().mean())}
    for i, e in enumerate(eps_list):
        out[format_eps(e)] = float(mask[:, i].double().mean())
    return out


def format_eps(eps: float) -> str:
    """0.1411... -> '36/255' when it is a non-integer multiple of 1/255, else the decimal ('1', '0.5')."""
    k = eps * 255
    if eps != round(eps) and abs(k - round(k)) < 1e-9:
        return f"{round(k)}/255"
    return f"{eps:g}"
