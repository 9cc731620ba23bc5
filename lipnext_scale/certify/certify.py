"""Certification math: pure functions over logits (paper.md B.1), in float64.

For a 1-Lipschitz feature map phi and a linear head f_j = w_j . phi(x) + b_j (for a LipNeXt, w_j are
the head's normalised rows `model.head.rows()`, exactly what its forward multiplies by), the logit gap
f_y - f_j changes by at most ||w_y - w_j|| * ||delta|| under an input perturbation delta, so the
prediction y cannot change within radius

    R(x) = min_{j != y} (f_y - f_j) / (L * ||w_y - w_j||)

where L bounds the feature map's Lipschitz constant (1 by construction; the rigorous bound of
`model.lipschitz` when weights are only approximately orthogonal). Without a head we use the generic
bound for an L-Lipschitz logit map: (top1 - top2) / (sqrt(2) L). A point is certified at eps iff it is
correctly classified and R > eps (strict: at R == eps a tie is reachable).

That is exact arithmetic. The job certifies the fp32 model as it runs: logits from `head_logits64` and
the floating-point allowances of `fp_error` subtracted (`certified_radius`'s keyword arguments).
"""

from __future__ import annotations

import math

import torch

from lipnext_scale.eps import CertifyInputError, format_eps


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


def model_pair_distances(model: torch.nn.Module) -> torch.Tensor:
    """`head_pair_distances` of the rows a LipNeXt's logits are computed with: the head's normalised rows
    (`model.head.rows()`), never its raw parameter (the head has no `.weight` to pick up by mistake)."""
    return head_pair_distances(model.head.rows())


def certified_radius(logits: torch.Tensor, pair_distances: torch.Tensor | None = None,
                     lipschitz: float = 1.0, *, gap_error: torch.Tensor | float = 0.0,
                     sample_gap_error: torch.Tensor | float = 0.0,
                     feature_error: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (prediction, margin, radius), all from float64 logits.

    `pair_distances`: from `model_pair_distances(model)` when the logits are a linear head on
    L-Lipschitz features; None for a generic L-Lipschitz logit map (radius = margin / (sqrt(2) L)).
    `margin` is top1 - top2 of the raw logits.

    Floating-point allowances (from `fp_error`; zero means exact arithmetic), with a pair one
    (`gap_error`, (C, C) or a scalar) and a per-sample one (`sample_gap_error`, (B,) or a scalar) that
    add up to how far a computed gap f_y - f_j may be from the exact one, and `feature_error` ((B,) or a
    scalar) the l2 error of the features counted where they are computed and where the certificate is
    used (E(x) + E(x')):
        R = min_j (gap_j - gap_error[y, j] - sample_gap_error) / (L d_j) - feature_error / L.
    A pair of identical rows (d_j = 0) leaves R alone only when its gap exceeds its allowance;
    otherwise R = -inf (not even the prediction is guaranteed).
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
    b, c = logits.shape
    if pair_distances.shape != (c, c):
        raise CertifyInputError(f"pair_distances of shape {tuple(pair_distances.shape)} do not match "
                                f"{c} classes")
    gap_error = _allowance("gap_error", gap_error, (c, c))
    sample_gap_error = _allowance("sample_gap_error", sample_gap_error, (b,))
    feature_error = _allowance("feature_error", feature_error, (b,))
    gaps = logits.gather(1, pred[:, None]) - logits  # f_pred - f_j >= 0
    gaps = gaps - (gap_error[pred] if gap_error.dim() == 2 else gap_error)
    gaps = gaps - (sample_gap_error[:, None] if sample_gap_error.dim() == 1 else sample_gap_error)
    dists = pair_distances.to(torch.float64)[pred]
    ratio = torch.where(dists > 0, gaps / dists.clamp_min(torch.finfo(torch.float64).tiny),
                        # identical rows: the gap never moves, so it only has to survive the rounding
                        torch.where(gaps > 0, torch.inf, -torch.inf))
    ratio.scatter_(1, pred[:, None], torch.inf)  # j == pred does not constrain
    radius = (ratio.min(dim=1).values - feature_error) / lipschitz
    return pred, margin, radius


def _allowance(name: str, value: torch.Tensor | float, shape: tuple[int, ...]) -> torch.Tensor:
    """A non-negative, finite float64 allowance: a scalar or a tensor of exactly `shape`."""
    t = torch.as_tensor(value, dtype=torch.float64)  # a tensor keeps its device: put it with the logits
    if t.dim() and tuple(t.shape) != shape:
        raise CertifyInputError(f"{name} of shape {tuple(t.shape)}: expected a scalar or {shape}")
    if not (torch.isfinite(t).all() and (t >= 0).all()):
        raise CertifyInputError(f"{name} must be finite and >= 0")
    return t


def head_logits64(features: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits in float64 from (fp32) features and exactly the rows and biases the forward uses: every
    input is converted without rounding, so only float64 rounding remains (bounded by the
    gamma(d + 2, u64) term of the head allowance in `fp_error.float_error_model`).
    This is what makes a huge common bias harmless: 2^20 + f keeps ~2^-32 resolution here, 1/8 in fp32.
    One matrix-vector product per sample, not one matrix product per batch: BLAS picks its kernel (so its
    summation order) by the batch's size, which moved float64 logits by ~1e-15 with the company a sample
    kept; this way a sample's radius does not depend on its batch (`lipnext serve` answers with the same
    numbers as this job). The cost is small beside the forward (~0.1 s per 256 samples at 1000 x 1024)."""
    w = rows.detach().to(torch.float64)
    b = bias.detach().to(torch.float64)
    features = features.detach().to(torch.float64)
    if not len(features):
        return features.new_zeros((0, w.shape[0]))
    return torch.stack([torch.addmv(b, w, f) for f in features])


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
