"""Resume: rank 0 picks the checkpoint, every rank loads its part of it, the engine and data position follow.

The job's start point (an explicit `train.resume`, else the run's newest valid checkpoint, else none) is
chosen and validated once, at job start (`preflight.check_job`); a worker restarted after a fault, an
elastic resize or a preemption resumes from the newest checkpoint this job wrote since
(`CheckpointManager.resume_point`), at whatever world size Ray Train restarted it with.

Every (re)start first plans the batch at its world size (`plan_for_world`, a `BatchPlan`): the global batch
(and with it the schedule, which counts optimizer steps) is the config's at every size; only the per-rank
micro-batch and gradient accumulation change, and the split is logged. The plan travels to the engine
config, the loader, the loop and the checkpoints' data position; the config (data.batch_size included)
stays what the user wrote.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist

from lipnext_scale.ckpt import CheckpointManager, StartPoint
from lipnext_scale.config import BatchPlan, JobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    step: int  # optimizer steps done
    batches_done: int  # this rank's position in its data stream
    resumed_from: str | None
    written_at_world: int | None = None  # the world size the checkpoint was written at (None: fresh start)
    plan: BatchPlan = field(kw_only=True)  # how each step is batched at this world size (`plan_for_world`)


def plan_for_world(cfg: JobConfig, world: int, rank: int = 0) -> BatchPlan:
    """How this rank batches a step at `world` ranks (`JobConfig.batch_plan`), computed once per (re)start and
    logged on rank 0; the config itself is not changed. Raises ConfigError."""
    plan = cfg.batch_plan(world)
    if rank == 0:
        low, high = cfg.train.worker_range
        log.warning("world size %d (train.num_workers %s): global batch %d = %d ranks x micro-batch %d x %d "
                    "accumulation steps", world, f"{low}-{high}" if low < high else low, plan.global_batch,
                    world, plan.micro, plan.accumulation)
    return plan


def resume(manager: CheckpointManager, built, start_url: str | None, plan: BatchPlan) -> Position:
    """Load the checkpoint to continue from into `built` (every rank); Position(0, 0, None) for a fresh start.
    `plan` is this world size's batching (`plan_for_world`); the Position carries it to the loop."""
    choice = [manager.resume_point(start_url) if manager.rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    url = choice[0]
    if url is None:
        _set_aside_unfinished(manager, None)
        return Position(0, 0, None, plan=plan)
    restored = manager.load(url, built.engine, built.model, built.manifold)
    world, step = manager.world, restored.step
    _set_aside_unfinished(manager, StartPoint(url, step, {}))
    # Same world size: exactly where this rank stopped. Another size: every rank's stream is another one
    # (streams are seeded by rank and world size), entered where a run at this size would be after `step`
    # steps; samples seen stay step x global batch either way.
    same = restored.world_size == world
    accum = plan.accumulation
    batches = restored.data.get("batches_per_rank", step * accum) if same else step * accum
    engine = built.engine
    engine.global_steps = step
    engine.micro_steps = step * accum
    engine.global_samples = step * plan.global_batch
    if manager.rank == 0:
        log.warning("resumed from %s (step %d, written at world size %d, now %d)", url, step,
                    restored.world_size, world)
    return Position(step, batches, url, restored.world_size, plan=plan)


def _set_aside_unfinished(manager: CheckpointManager, start: StartPoint | None) -> None:
    """Rank 0: checkpoints of this run after the resume point can only be unfinished ones (a restart resumes
    from the newest valid one), left by workers killed mid-write; they move to `{run}/superseded-*/` (logged,
    not deleted) before this attempt writes the same steps again, possibly at another world size."""
    if manager.rank == 0:
        manager.set_aside_after(start)


def restart_scalars(position: Position, world: int) -> dict[str, float]:
    """TensorBoard scalars written at the step every (re)start begins from: a run's restarts and resizes are
    the points of `run/world_size`; `run/resumed` tells a continuation (1) from a fresh start (0), and
    `run/checkpoint_world_size` is the size the checkpoint it continues was written at (0: none); the batching
    at this size is `run/micro_batch`, `run/grad_accum` and `run/global_batch` (the Position's plan)."""
    return {"run/world_size": world, "run/resumed": float(position.resumed_from is not None),
            "run/checkpoint_world_size": position.written_at_world or 0,
            "run/micro_batch": position.plan.micro, "run/grad_accum": position.plan.accumulation,
            "run/global_batch": position.plan.global_batch}
