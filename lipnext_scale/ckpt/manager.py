"""The one owner of a run's checkpoints: which one a job starts from, saving, loading at any world size, pruning.

    manager = CheckpointManager(run_url, keep_last=3)              # driver: nothing distributed
    start = manager.start_point(cfg.train.resume)                  # explicit > newest valid > none
    manager.set_aside_after(start)                                  # the run keeps one line of checkpoints
    # each rank of the job:
    manager = CheckpointManager(run_url, retention=Retention(...), rank=r, world=n, report=report, device=device)
    url = manager.resume_point(start.url if start else None)       # a restart after a fault: this job's newest
    info = manager.load(url, engine, model, manifold)
    manager.save(step, engine, model, manifold, data=..., config=..., metrics=...)   # then prunes

One line of checkpoints: a job that starts from checkpoint S moves the run's checkpoints that would come
after S (an abandoned continuation, or corrupt ones) to `{run}/superseded-<time>/`, logged, never deleted.
From then on "the newest valid checkpoint of the run" is always this job's latest, which is what a restart
after a fault resumes and what pruning keeps. Ray Train uploads what `save` writes (`report`), possibly
while training goes on; Ray's own checkpoint bookkeeping is not used to find, keep or delete anything: its
`CheckpointConfig` keeps the best K by a metric plus only the single latest, and knows neither our manifests
(a half-uploaded checkpoint) nor our certification records.

Retention (`prune`, rank 0 after each save, and the driver once the run is over; the rule is
`ckpt/retention.py`): the newest `keep_last` complete checkpoints (resume points), plus the `keep_best` best by
certified accuracy (their certification reports, `RunLayout.report`, read by `Retention.score`), plus every
checkpoint whose report is there but unreadable or not finite (logged: a score that cannot be read never costs
a checkpoint), plus every checkpoint whose certification has not finished, plus every incomplete one (an
upload in progress, or one left by a crash: resume skips it and the next start sets it aside).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lipnext_scale.ckpt.format import (
    CheckpointError, VerifiedReader, find_latest_valid, list_checkpoints, read_meta, validate_checkpoint,
    write_rank_files,
)
from lipnext_scale.ckpt.layout import RunLayout, step_dir_name
from lipnext_scale.ckpt.retention import (
    Certification, Retention, UnreadableScore, read_certification, retained, superseded, write_certification,
)
from lipnext_scale.ckpt.staging import new_staging_dir, sweep_orphaned_staging
from lipnext_scale.ckpt.state import load_manifold_state, load_train_state, manifold_tensors
from lipnext_scale.ckpt.zero import collect_local_state, param_shapes, restore_local_state
from lipnext_scale.storage import (
    atomic_write_bytes, is_dir, join_url, list_dir, makedirs, move, read_bytes, remove, versions,
)

log = logging.getLogger(__name__)

# report(metrics, local checkpoint directory or None, checkpoint directory name or None) -> owned: Ray Train's
# `ray.train.report`, or any callable that copies the directory to `{run}/{name}`. It returns True when it
# took the directory over (an asynchronous upload deletes it once stored); otherwise `save` deletes it.
# A report with the attribute `waits_for_staging = True` takes every directory over and uploads it only once
# `wait_until_staged` says its files are all written: `save` then writes them in a background thread, and
# the training step pays only for copying its state in memory (the asynchronous checkpoint).
Report = Callable[[dict[str, Any], "str | None", "str | None"], "bool | None"]
STAGING_FAILED = "staging-failed.txt"  # written into a staging directory whose background write failed


def wait_until_staged(local: str, poll_s: float = 0.05) -> None:
    """Block until a staging directory `save` writes in the background is complete (its manifest, written
    last, is there); raise CheckpointError when the write failed."""
    while True:
        names = [e.name for e in list_dir(local, CheckpointError)]
        if STAGING_FAILED in names:
            why = read_bytes(join_url(local, STAGING_FAILED), CheckpointError).decode("utf-8", errors="replace")
            raise CheckpointError(f"writing checkpoint files to {local} failed: {why}")
        if any(n.startswith("manifest-rank-") and n.endswith(".json") for n in names):
            return
        time.sleep(poll_s)


def _discard(local: str) -> None:
    """Delete a local staging directory, whatever state it is in (nothing to report when that fails)."""
    with contextlib.suppress(Exception):
        remove(local, CheckpointError, recursive=True, missing_ok=True)


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
    # How long a save waits for the previous asynchronous upload before giving up on it: a stalled upload
    # (a hung object store) must not keep a preempted process from exiting. The upload is then left as it
    # is, recognisably incomplete (no manifest, or a file short of its size): never resumed, never pruned.
    UPLOAD_WAIT_S = 900.0

    def __init__(self, run_url: str, *, keep_last: int = 3, retention: Retention | None = None, rank: int = 0,
                 world: int = 1, report: Report | None = None, device: str | torch.device = "cpu"):
        self.run_url = run_url.rstrip("/")
        self.layout = RunLayout(self.run_url)
        self.retention = retention or Retention(keep_last=keep_last)
        self.rank, self.world, self.report, self.device = rank, world, report, device
        self._complete: set[str] = set()  # checkpoints seen complete (they never change afterwards)
        self._uploading: tuple[str, str] | None = None  # (staging directory, checkpoint URL) of the last save
        self._writer: ThreadPoolExecutor | None = None  # the background write of asynchronous saves
        self._writing: Future | None = None
        if report is not None:  # a rank that saves: its host's staging left by killed processes goes first
            sweep_orphaned_staging()

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
        aside = self.layout.superseded(time.strftime('%Y%m%d-%H%M%S'))
        makedirs(aside, CheckpointError)
        for url in later:
            move(url, join_url(aside, url.rsplit("/", 1)[1]), CheckpointError)
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
        (Ray Train uploads it to `{run}/step_XXXXXXXX`, now or in the background); then rank 0 prunes. A
        state holding NaN/Inf on any rank is refused on every rank (NonFiniteState) before anything is
        written. With a report that `waits_for_staging`, the files are written in a background thread from
        copies of the state. At most one checkpoint per rank is being written or uploaded: a save waits
        for the previous one."""
        tensors, scalars, keys = collect_local_state(engine, model)  # CPU copies of this rank's partitions
        manifold_state = manifold.state_dict()  # this rank's owned matrices only
        owned = manifold_tensors(manifold_state.pop("manifold"))
        owned = {k: v.detach().to("cpu", copy=True) for k, v in owned.items()}  # training goes on changing them
        self._check_finite(step, {**tensors, **owned})
        extra = {"optim_scalars": scalars, "manifold": manifold_state, "data": data}
        meta = None
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world, "param_shapes": param_shapes(model),
                    "optim_state_keys": keys, "manifold_owners": manifold.owner_map(), "config": config,
                    "time": time.time(), "versions": _versions()}
        self._wait_for_upload()
        local = new_staging_dir()
        try:
            if getattr(self.report, "waits_for_staging", False):
                self._writer = self._writer or ThreadPoolExecutor(1, thread_name_prefix="lipnext-ckpt-write")
                self._writing = self._writer.submit(self._write_in_background, local, tensors, extra, meta, owned)
            else:
                write_rank_files(local, self.rank, tensors, extra, meta, manifold=owned)
            taken = self.report(metrics, local, step_dir_name(step))
        except BaseException:
            if self._writing is None or self._writing.done():
                _discard(local)
            raise
        if taken:
            self._uploading = (local, self.layout.checkpoint(step))
        else:
            _discard(local)
        if self.rank == 0 and self._writing is None:
            self.prune()  # only complete checkpoints are candidates: no need to wait for the other ranks

    def _write_in_background(self, local: str, tensors, extra, meta, owned) -> None:
        _write_staging(local, self.rank, tensors, extra, meta, owned)
        if self.rank == 0:
            self.prune()  # here too, off the training step

    def _wait_for_upload(self) -> None:
        """Back-pressure for asynchronous saves slower than ckpt.every_steps: rather than holding one more
        copy of the state per save, wait until the previous one is written and stored (its staging
        directory deleted by the uploader, or its files all in storage), at most UPLOAD_WAIT_S."""
        if self._writing is not None:
            self._writing.result()  # a background write that failed raises here (and in the uploader)
            self._writing = None
        if self._uploading is None:
            return
        local, url = self._uploading
        started, warned = time.monotonic(), False
        while is_dir(local, CheckpointError) and not self._stored(local, url):
            waited = time.monotonic() - started
            if waited > self.UPLOAD_WAIT_S:
                self._uploading = None
                raise CheckpointError(
                    f"the upload of {url} has not finished after {waited:.0f} s (the storage is not answering); it "
                    "is left incomplete, which resume and pruning recognise: the run resumes from the last complete "
                    "checkpoint")
            if not warned and waited > 10:
                log.warning("rank %d: the upload of %s is slower than ckpt.every_steps; this save waits for it",
                            self.rank, url)
                warned = True
            time.sleep(0.1)
        self._uploading = None

    @staticmethod
    def _stored(local: str, url: str) -> bool:
        """Every file of a staging directory is in storage at `url` with its size."""
        try:
            stored = _stored_sizes(url)
            return all(stored.get(e.name) == e.size for e in list_dir(local, CheckpointError))
        except (OSError, CheckpointError):
            return False

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

    def is_complete(self, url: str) -> bool:
        """Every rank's manifest is there and every file it lists has its size: the upload has finished.
        (Sizes, not hashes: this runs after every save; resume checks the hashes.)"""
        if url in self._complete:
            return True
        try:
            expected = VerifiedReader(url).expected  # every rank's manifest, and meta.json checked against its hash
            sizes = _stored_sizes(url)
        except (CheckpointError, OSError):
            return False
        if all(sizes.get(name) == entry["bytes"] for name, entry in expected.items()):
            self._complete.add(url)
            return True
        return False

    def _supersede_waiting(self, records: dict[int, Certification]) -> None:
        """Record as skipped the waiting certifications beyond the newest `retention.max_waiting` (updates
        `records`); their task, should Ray still start it, finds the record and returns at once."""
        waiting = [step for step, record in records.items() if record.state == "queued"]
        for step in superseded(waiting, self.retention.max_waiting):
            records[step] = Certification("skipped")
            write_certification(self.run_url, step, records[step],
                                reason=f"superseded: more than certify.max_waiting={self.retention.max_waiting} "
                                       "newer checkpoints were waiting for certification")
            log.warning("%s: certification skipped, superseded by newer checkpoints waiting for it (certification "
                        "is slower than ckpt.every_steps; see certify.max_waiting)",
                        self.layout.checkpoint(step))

    def _score(self, step: int) -> float | None:
        """Checkpoint `step`'s certified score for ranking; NaN (kept, never ranked) when its report is unreadable."""
        try:
            return self.retention.score(self.run_url, step, self.retention.best_eps)
        except UnreadableScore as e:
            log.warning("%s is kept: its certification score cannot be ranked (%s)", self.layout.checkpoint(step), e)
            return math.nan

    def prune(self, *, settled: bool = False) -> list[str]:
        """Delete the complete checkpoints `retention` does not keep (rank 0 after a save; the driver with
        `settled=True` once the run is over and every certification has finished or been given up)."""
        r, now = self.retention, time.time()
        found = self.checkpoints()
        complete = [step for step, url in found if self.is_complete(url)]
        unfinished, scores = set(), {}
        if r.certified:
            records = {step: read_certification(self.run_url, step) for step in complete}
            if not settled:
                self._supersede_waiting(records)
            for step, record in records.items():
                if not settled and not record.finished(now):
                    unfinished.add(step)
                elif r.keep_best:
                    scores[step] = self._score(step)
        keep = retained(complete, scores, unfinished, r.keep_last, r.keep_best)
        doomed = [url for step, url in found if step in complete and step not in keep]
        for url in doomed:
            # missing_ok: another pruner (the driver's final one) got there first
            remove(url, CheckpointError, recursive=True, missing_ok=True)
            self._complete.discard(url)
        if doomed:
            log.info("pruned %s (kept %s)", [u.rsplit("/", 1)[1] for u in doomed],
                     [step_dir_name(s) for s in sorted(keep)])
        return doomed


def _stored_sizes(url: str) -> dict[str, int | None]:
    """File name -> size of what storage holds directly under checkpoint `url` (raises OSError, CheckpointError)."""
    return {e.name: e.size for e in list_dir(url, CheckpointError)}


@functools.cache
def _versions() -> dict[str, str]:
    return versions()  # importlib.metadata lookups: tens of ms, the same for every checkpoint of a process


def _write_staging(local: str, rank: int, tensors: dict[str, torch.Tensor], extra: dict[str, Any],
                   meta: dict[str, Any] | None, manifold: dict[str, torch.Tensor]) -> None:
    """The background half of an asynchronous save: this rank's files (manifest last), or a marker saying why not."""
    try:
        write_rank_files(local, rank, tensors, extra, meta, manifold=manifold)
    except BaseException as e:
        atomic_write_bytes(join_url(local, STAGING_FAILED), " ".join(f"{type(e).__name__}: {e}".split()).encode(),
                           CheckpointError)
        raise
