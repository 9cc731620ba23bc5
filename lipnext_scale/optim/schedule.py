"""Learning-rate schedule shared by the manifold and the Euclidean groups: linear warmup, then cosine."""

from __future__ import annotations

import math


def lr_multiplier(step: int, cfg) -> float:
    """Multiplier of the base learning rates at (0-based) optimizer step `step`.

    Warmup: (step + 1) / warmup_steps for the first `warmup_steps` steps (never 0, so step 0 moves).
    Then cosine from 1 to `min_lr_ratio`, reached at `total_steps` and held afterwards.
    """
    if step < 0:
        raise ValueError(f"lr_multiplier: step={step} must be >= 0")
    warmup, total, floor = cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
