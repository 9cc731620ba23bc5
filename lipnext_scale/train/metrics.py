"""Small pure helpers of the training loop: DeepSpeed config, phase timer, monitoring bounds."""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

from lipnext_scale.config import ConfigError, JobConfig

PHASES = ("data", "forward", "backward", "retraction", "optimizer", "checkpoint")


def deepspeed_config(base: dict[str, Any], cfg: JobConfig, world_size: int) -> dict[str, Any]:
    """The engine config: ZeRO settings from the JSON file, everything the job config owns set from it
    (so batch, accumulation, clipping and precision have one source of truth)."""
    out = copy.deepcopy(base)
    zero = out.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3:
        raise ConfigError(f"train.deepspeed={cfg.train.deepspeed!r}: zero_optimization.stage must be 3 "
                          f"(got {zero.get('stage')!r}); the manifold step works on ZeRO-3 partitions")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler", "fp16"):
        out.pop(key, None)
    out["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    out["gradient_accumulation_steps"] = cfg.train.grad_accum
    out["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * world_size
    # Clips the Euclidean group; the manifold step clips its own gradients (they are zeroed before).
    out["gradient_clipping"] = cfg.optim.grad_clip
    out["bf16"] = {**out.get("bf16", {}), "enabled": cfg.train.precision == "bf16"}
    out["zero_allow_untested_optimizer"] = True  # our client optimizer (AdamW + manifold groups)
    out.setdefault("steps_per_print", 10 ** 9)
    return out


def lipschitz_from_orthogonality_error(max_abs_error: float, shapes: list[tuple[int, int]]) -> float:
    """A rigorous bound on the feature map's Lipschitz constant from the largest |X^T X - I| entry.

    For a matrix whose (smaller) Gram matrix is I + E, ||X||_2^2 <= 1 + ||E||_2 <= 1 + p max|E| (p the
    Gram size); the network's constant is at most the product over the matrices an input passes through
    (paper.md B.1): `shapes` lists them in `model.lipschitz_path()` order, with repeats (R twice per block).
    """
    log_bound = sum(0.5 * math.log1p(min(s) * max_abs_error) for s in shapes)
    return math.exp(log_bound)


class PhaseTimer:
    """Wall seconds per phase of the step, accumulated between `take()` calls."""

    def __init__(self, sync=None):
        self.totals: dict[str, float] = defaultdict(float)
        self.sync = sync or (lambda: None)  # e.g. torch.cuda.synchronize: time the kernels, not their launch

    @contextmanager
    def phase(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[name] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        out = {p: self.totals.get(p, 0.0) for p in PHASES}
        self.totals.clear()
        return out
