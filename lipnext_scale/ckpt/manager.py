"""The one owner of a run's checkpoints: which one a job starts from, saving, loading at any world size, pruning.

    manager = CheckpointManager(run_url, keep_last=3)              # driver: nothing distributed
    start = manager.start_point(cfg.train.resume)                  # explicit > newest valid > none
    manager.set_aside_after(start)                                  # the run keeps one line of checkpoints
    # each rank of the job:
    manager = CheckpointManager(run_url, keep_last=3, rank=r, world=n, report=report, device=device)
    url = manager.resume_point(start.url if start else None)       # a restart after a fault: this job's newest
    info = manager.load(url, engine, model, manifold)
    manager.save(step, engine, model, manifold, data=..., config=..., metrics=...)   # then prunes

One line of checkpoints: a job that starts from checkpoint S moves the run's checkpoints that would come
after S (an abandoned continuation, or corrupt ones) to `{run}/superseded-<time>/`, logged, never deleted.
From then on "the newest valid checkpoint of the run" is always this job's latest, which is what a restart
after a fault resumes and what pruning keeps. Ray Train uploads what `save` writes (`report`), so Ray's own
checkpoint bookkeeping is not used to find, keep or delete anything.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lipnext_scale.ckpt.format import (
    CheckpointError, checkpoint_dir_name, find_latest_valid, list_checkpoints, read_meta, validate_checkpoint,
    write_rank_files,
)
from lipnext_scale.ckpt.state import load_manifold_state, load_train_state, manifold_tensors
from lipnext_scale.ckpt.zero import collect_local_state, param_shapes, restore_local_state
from lipnext_scale.storage import join_url, url_to_fs, versions

log = logging.getLogger(__name__)

# report(metrics, local checkpoint directory or None, checkpoint directory name or None): Ray Train's
# `ray.train.report`, or any callable that copies the directory to `{run}/{name}`.
Report = Callable[[dict[str, Any], "str | None", "str | None"], None]


def _path(url: str) -> str:
    return url_to_fs(url, CheckpointError)[1]


class NonFiniteState(CheckpointError):
    """The state about to be saved holds NaN/Inf: it is not written (the run has diverged)."""


@dataclass(frozen=True)
class StartPoint:
    """The checkpoint a job starts from, validated at job start."""

    url: str
    step: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class Restored:
    """What the loop needs to know after `load`: where the checkpoint was in training."""

    url: str
    step: int
    world_size: int  # the world size it was written at
    data: dict[str, Any]  # data position of the writer's rank 0 (batches per rank, seeds)


class CheckpointManager:
    def __init__(self, run_url: str, *, keep_last: int = 3, rank: int = 0, world: int = 1,
                 report: Report | None = None, device: str | torch.device = "cpu"):
        self.run_url, self.keep_last = run_url.rstrip("/"), keep_last
        self.rank, self.world, self.report, self.device = rank, world, report, device

    # ------------------------------------------------------------------ which checkpoint

    def checkpoints(self) -> list[tuple[int, str]]:
        return list_checkpoints(self.run_url)

    def latest_valid(self, after_step: int = -1) -> str | None:
        return find_latest_valid(self.run_url, after_step)

    def start_point(self, resume: str) -> StartPoint | None:
        """The checkpoint a job starts from (`train.resume`): an explicit checkpoint URL wins over this run's
        own checkpoints; "auto" is the run's newest valid checkpoint (None when it has none); "none" is a
        fresh start. Validates every file of the chosen checkpoint; raises CheckpointError."""
        if resume == "none":
            return None
        url = self.latest_valid() if resume == "auto" else resume.rstrip("/")
        if url is None:
            return None
        meta = validate_checkpoint(url)
        return StartPoint(url, int(meta["step"]), meta)

    def in_run(self, url: str) -> bool:
        """Whether `url` is one of this run's checkpoints (not another run's)."""
        return url.startswith(self.run_url + "/")

    def set_aside_after(self, start: StartPoint | None) -> list[str]:
        """Move the run's checkpoints that would follow `start` (higher steps; for a start from another
        run or a fresh start, also the step it is copied to) to `{run}/superseded-<time>/`. Returns them."""
        after = -1 if start is None else start.step - (0 if self.in_run(start.url) else 1)
        later = [url for step, url in self.checkpoints() if step > after]
        if not later:
            return []
        fs, _ = url_to_fs(self.run_url, CheckpointError)
        aside = join_url(self.run_url, f"superseded-{time.strftime('%Y%m%d-%H%M%S')}")
        fs.makedirs(_path(aside), exist_ok=True)
        for url in later:
            fs.mv(_path(url), _path(join_url(aside, url.rsplit("/", 1)[1])), recursive=True)
        log.warning("this job starts from %s: moved the run's later checkpoints %s to %s (not deleted)",
                    start.url if start else "scratch", [u.rsplit("/", 1)[1] for u in later], aside)
        return later

    def resume_point(self, start_url: str | None) -> str | None:
        """In a worker: this run's newest valid checkpoint after the job's start point (written by this job
        before a fault restarted it), else the start point itself."""
        after = -1 if start_url is None else int(read_meta(start_url)["step"])
        return self.latest_valid(after_step=after) or start_url

    # ------------------------------------------------------------------ save, load, prune

    def save(self, step: int, engine, model, manifold, *, data: dict[str, Any], config: dict[str, Any],
             metrics: dict[str, Any]) -> None:
        """Every rank: write its part of checkpoint `step` to a local staging directory and `report` it
        (Ray Train uploads it to `{run}/step_XXXXXXXX`); then rank 0 prunes. A state holding NaN/Inf on any
        rank is refused on every rank (NonFiniteState) before anything is written."""
        tensors, scalars, keys = collect_local_state(engine, model)
        manifold_state = manifold.state_dict()  # this rank's owned matrices only
        owned = manifold_tensors(manifold_state.pop("manifold"))
        self._check_finite(step, {**tensors, **owned})
        extra = {"optim_scalars": scalars, "manifold": manifold_state, "data": data}
        meta = None
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world, "param_shapes": param_shapes(model),
                    "optim_state_keys": keys, "manifold_owners": manifold.owner_map(), "config": config,
                    "time": time.time(), "versions": versions()}
        with tempfile.TemporaryDirectory(prefix="lipnext-ckpt-") as local:
            write_rank_files(local, self.rank, tensors, extra, meta, manifold=owned)
            self.report(metrics, local, checkpoint_dir_name(step))
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank's files are in storage before an older checkpoint is deleted
        if self.rank == 0:
            self.prune()

    def _check_finite(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        bad = sorted(n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        flag = torch.tensor([float(bool(bad))], device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(flag)
        if float(flag[0]) > 0:
            where = f"rank {self.rank}: {bad[:3]}" if bad else f"another rank (not rank {self.rank})"
            raise NonFiniteState(f"the training state at step {step} holds NaN/Inf ({where})")

    def load(self, url: str, engine, model, manifold) -> Restored:
        """Every rank: read this rank's ZeRO-3 partitions of `url` (written at any world size) into the
        engine, and the manifold state of the matrices it owns now from their old owners' files."""
        state = load_train_state(url, partition=(self.rank, self.world))
        restore_local_state(engine, model, state)
        owned = load_manifold_state(url, [s.name for s in manifold.owned])
        manifold.load_state_dict({**state.manifold_extra, "format": manifold.scalars()["format"], "manifold": owned})
        return Restored(url, state.step, state.world_size, state.data)

    def prune(self) -> list[str]:
        """Delete all but the newest `keep_last` checkpoints of the run (rank 0, after a complete save)."""
        doomed = [url for _, url in self.checkpoints()[:-self.keep_last]]
        fs, _ = url_to_fs(self.run_url, CheckpointError)
        for url in doomed:
            fs.rm(_path(url), recursive=True)
        return doomed
