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

    Computed from direct differences with a small floor under the square root: the gradient of a norm
    at 0 (the diagonal) is undefined, and the diagonal never enters the loss anyway.
    """
    diff = head_weight[:, None, :] - head_weight[None, :, :]
    return (diff.pow(2).sum(-1) + 1e-12).sqrt()


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
