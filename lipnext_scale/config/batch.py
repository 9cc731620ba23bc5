"""Batch arithmetic of a run: the elastic worker range, the global batch and its split at a world size.

One `BatchPlan` says what a step is at W workers: each worker runs `accumulation` micro-batches of `micro`
images, and `global_batch` = micro x accumulation x W images make one optimizer step at every allowed W.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, NamedTuple

from lipnext_scale.config.errors import ConfigError

if TYPE_CHECKING:
    from lipnext_scale.config.sections import TrainConfig

_WORKER_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


class BatchPlan(NamedTuple):
    micro: int  # images per worker per forward/backward, at most data.batch_size
    accumulation: int  # micro-batches per worker per optimizer step
    global_batch: int  # images per optimizer step over all workers


def worker_range(num_workers: int | str | list[int]) -> tuple[int, int]:
    """(fewest, most) workers: (n, n) for a fixed count, else the elastic range of train.num_workers."""
    value, how = num_workers, 'use a count such as 4 or a range such as "2-4" or [2, 4]'
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str) and _WORKER_RANGE.fullmatch(value):
        found = _WORKER_RANGE.fullmatch(value)
        low = int(found[1])
        high = int(found[2]) if found[2] else low
    elif isinstance(value, list) and len(value) == 2:
        low, high = value
    else:
        raise ConfigError(f"train.num_workers={value!r}: {how}")
    if not 1 <= low <= high:
        raise ConfigError(f"train.num_workers={value!r}: need 1 <= fewest <= most workers; {how}")
    return low, high


def global_batch_for(train: TrainConfig, max_micro_batch: int) -> int:
    """train.global_batch, or its default: data.batch_size (`max_micro_batch`) x grad_accum x most workers."""
    return train.global_batch or max_micro_batch * train.grad_accum * worker_range(train.num_workers)[1]


def check_global_batch(train: TrainConfig, max_micro_batch: int, world: int | None = None) -> int:
    """The global batch, checked to split evenly over every allowed world size (and `world`, if given);
    raises ConfigError naming the fix."""
    global_batch, (low, high) = global_batch_for(train, max_micro_batch), worker_range(train.num_workers)
    bad = [w for w in (*range(low, high + 1), *([world] if world else [])) if global_batch % w]
    if bad:
        step = math.lcm(*range(low, high + 1))
        what = (f"train.global_batch={global_batch}" if train.global_batch else f"the global batch {global_batch} "
                f"(data.batch_size={max_micro_batch} x train.grad_accum={train.grad_accum} x {high} workers)")
        raise ConfigError(f"{what} does not split evenly over {bad[0]} workers (train.num_workers="
                          f"{train.num_workers!r}); set train.global_batch to a multiple of {step}, e.g. "
                          f"--set train.global_batch={max(step, global_batch // step * step)}"
                          + ("" if step <= 64 * global_batch else
                             f", or a narrower range or a fixed count: every size of {low}-{high} takes an "
                             "equal share of each step's images"))
    return global_batch


def plan_batch(train: TrainConfig, world: int, max_micro_batch: int) -> BatchPlan:
    """The step at `world` workers: the global batch stays what the config says; the micro-batch is the largest
    divisor of the worker's share within data.batch_size (`max_micro_batch`), which makes the fewest
    accumulation steps. Raises ConfigError."""
    global_batch = check_global_batch(train, max_micro_batch, world)
    share = global_batch // world
    accum = next(a for a in range(-(-share // max_micro_batch), share + 1) if share % a == 0)
    return BatchPlan(micro=share // accum, accumulation=accum, global_batch=global_batch)
