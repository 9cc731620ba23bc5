"""Certified-training losses (paper.md B.6): pure functions of logits, labels and the head's rows.

A prediction is certified at eps when f_y - f_j > eps * ||w_y - w_j|| for every j != y (paper.md B.1).
Both losses raise each non-target logit j by (a multiple of) eps * ||w_y - w_j|| before the softmax, so
the loss is small only when the certificate holds:

- `emma` (EMMA, LiResNet++; the paper's loss): logit j is raised by eps_j ||w_y - w_j|| with
  eps_j = clamp((f_y - f_j) / ||w_y - w_j||, 0.01 eps, eps), treated as a constant (no gradient): each
  class is pushed only as far as the certificate needs, and close competitors are not over-penalised.
- `margin` (our earlier loss): logit j is raised by offset * eps * ||w_y - w_j||, then divided by a
  temperature.

The training eps is ramped (LiResNet++): from `eps_ramp_start * eps` at step 0 linearly to
`eps_ramp_end * eps` at `eps_ramp_fraction` of the run, then held (`training_eps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipnext_scale.config import LossConfig


def training_eps(step: int, total_steps: int, cfg: LossConfig) -> float:
    """The loss's eps at optimizer step `step` of `total_steps` (the LiResNet++ ramp)."""
    ramp_steps = cfg.eps_ramp_fraction * total_steps
    progress = 1.0 if ramp_steps <= 0 else min(step / ramp_steps, 1.0)
    return cfg.eps * (cfg.eps_ramp_start + (cfg.eps_ramp_end - cfg.eps_ramp_start) * progress)


def head_row_distances(head_rows: torch.Tensor) -> torch.Tensor:
    """(C, C) matrix of ||w_i - w_j||_2, differentiable (the training loss shapes the head through it).

    From the Gram matrix, ||w_i||^2 + ||w_j||^2 - 2 w_i.w_j: one C x C matmul. Direct differences would
    materialise (and keep for backward) a C x C x width tensor: 16 GB for ImageNet's 1000 classes at width
    4096. The cancellation this risks is harmless in a training loss; certification uses exact float64
    differences (`certify.head_pair_distances`). The floor keeps the gradient finite on the diagonal,
    which never enters the loss anyway.
    """
    gram = head_rows @ head_rows.t()
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(1e-12).sqrt()


def _target_distances(logits: torch.Tensor, labels: torch.Tensor, head_rows: torch.Tensor):
    """(||w_y - w_j|| per sample and class, mask of the non-target classes), float32."""
    dist = head_row_distances(head_rows.float())[labels]  # (B, C), row y of the matrix
    not_target = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    return dist, not_target


def emma_logits(logits: torch.Tensor, labels: torch.Tensor, head_rows: torch.Tensor, eps: float) -> torch.Tensor:
    """EMMA's logits: each non-target logit raised by eps_j ||w_y - w_j||, eps_j clamped to [0.01 eps, eps]
    from the current gap and detached."""
    logits = logits.float()
    dist, not_target = _target_distances(logits, labels, head_rows)
    gap = logits.gather(1, labels[:, None]) - logits  # f_y - f_j
    eps_j = (gap / dist).clamp(0.01 * eps, eps).detach()
    return logits + torch.where(not_target, eps_j * dist, 0.0)


def margin_logits(logits: torch.Tensor, labels: torch.Tensor, head_rows: torch.Tensor, eps: float,
                  cfg: LossConfig) -> torch.Tensor:
    """Logits with every non-target class raised by offset * eps * ||w_y - w_j||, / temperature."""
    logits = logits.float()
    dist, not_target = _target_distances(logits, labels, head_rows)
    return (logits + torch.where(not_target, cfg.offset * eps * dist, 0.0)) / cfg.temperature


def certified_loss(logits: torch.Tensor, labels: torch.Tensor, head_rows: torch.Tensor, eps: float,
                   cfg: LossConfig) -> torch.Tensor:
    """Mean cross-entropy of the `cfg.kind` loss's raised logits, in float32 even for bf16 logits.
    `head_rows`: the rows the logits were computed with (`model.head.rows()`)."""
    if cfg.kind == "emma":
        raised = emma_logits(logits, labels, head_rows, eps)
    else:
        raised = margin_logits(logits, labels, head_rows, eps, cfg)
    return F.cross_entropy(raised, labels)
