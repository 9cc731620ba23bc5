"""Resume: rank 0 picks the checkpoint, every rank loads its part of it, the engine and data position follow.

The job's start point (an explicit `train.resume`, else the run's newest valid checkpoint, else none) is
chosen and validated once, at job start (`preflight.check_job`); a worker restarted after a fault resumes
from the newest checkpoint this job wrote since (`CheckpointManager.resume_point`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.distributed as dist

from lipnext_scale.ckpt import CheckpointManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    step: int  # optimizer steps done
    batches_done: int  # this rank's position in its data stream
    resumed_from: str | None


def resume(manager: CheckpointManager, built, start_url: str | None, *, grad_accum: int, batch_size: int) -> Position:
    """Load the checkpoint to continue from into `built` (every rank); Position(0, 0, None) for a fresh start."""
    choice = [manager.resume_point(start_url) if manager.rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    url = choice[0]
    if url is None:
        return Position(0, 0, None)
    restored = manager.load(url, built.engine, built.model, built.manifold)
    world, step = manager.world, restored.step
    # Same world size: exactly where this rank stopped. Otherwise: the same number of samples seen.
    per_rank = restored.data.get("batches_per_rank", step * grad_accum)
    batches = per_rank if restored.world_size == world else round(per_rank * restored.world_size / world)
    engine = built.engine
    engine.global_steps = step
    engine.micro_steps = step * grad_accum
    engine.global_samples = step * grad_accum * batch_size * world
    if manager.rank == 0:
        log.warning("resumed from %s (step %d, written at world size %d, now %d)", url, step,
                    restored.world_size, world)
    return Position(step, batches, url)
