"""Margin-aware cross-entropy (paper.md B.9), a pure function of logits, labels and the head's rows.

A prediction is certified at eps when f_y - f_j > eps * ||w_y - w_j|| for every j != y (paper.md B.1).
Training therefore raises each non-target logit by offset * eps_train * ||w_y - w_j|| before the
softmax: the loss is small only when the certificate holds with room to spare. Dividing by a
temperature < 1 sharpens the softmax so that large margins keep being rewarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipnext_scale.config import LossConfig


def head_row_distances(head_weight: torch.Tensor) -> torch.Tensor:
    """(C, C) matrix of ||w_i - w_j||_2, differentiable (the training loss shapes the head through it).

    From the Gram matrix, ||w_i||^2 + ||w_j||^2 - 2 w_i.w_j: one C x C matmul. Direct differences would
    materialise (and keep for backward) a C x C x width tensor: 16 GB for ImageNet's 1000 classes at width
    4096. The cancellation this risks is harmless in a training loss; certification uses exact float64
    differences (`certify.head_pair_distances`). The floor keeps the gradient finite on the diagonal,
    which never enters the loss anyway.
    """
    gram = head_weight @ head_weight.t()
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(1e-12).sqrt()


def margin_logits(logits: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor,
                  cfg: LossConfig) -> torch.Tensor:
    """Logits with every non-target class raised by offset * eps_train * ||w_y - w_j||, / temperature."""
    dist = head_row_distances(head_weight.to(logits.dtype))[labels]  # (B, C), row y of the matrix
    not_target = torch.ones_like(logits).scatter_(1, labels[:, None], 0.0)
    return (logits + cfg.offset * cfg.eps_train * dist * not_target) / cfg.temperature


def margin_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor,
                         cfg: LossConfig) -> torch.Tensor:
    """Mean margin-aware cross-entropy over the batch, computed in float32 even for bf16 logits."""
    shifted = margin_logits(logits.float(), labels, head_weight.float(), cfg)
    return F.cross_entropy(shifted, labels)
