"""Which checkpoints a run keeps, and the certification records that decide it.

`Retention` says what `CheckpointManager.prune` keeps: the newest `keep_last` complete checkpoints (resume
points), the `keep_best` best by certified accuracy, and every one whose certification has not finished.
`retained` is that rule as a pure function of steps and scores (tests/unit/test_retention.py): only finite
scores are ranked, a report that is there but unreadable or not finite keeps its checkpoint (logged), and the
newest complete checkpoint and the best readable one are always kept.

A checkpoint's certification during training (`lipnext_scale.certify.during_training`) leaves
`{run}/certify/step_XXXXXXXX/` (`RunLayout.certification`): the certification job's outputs (report.json,
written last) and `status.json`, which the certifying task rewrites at each change of state (`Certification`).
The records live here, below certify/, because pruning reads and supersedes them; the score of a report is
read by certify/report.py (the one report reader), which the composition root hands in as `Retention.score`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from lipnext_scale.ckpt.format import CheckpointError
from lipnext_scale.ckpt.layout import RunLayout
from lipnext_scale.storage import read_json, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    """Which checkpoints `prune` keeps (see the module docstring). `best_eps`: the radius whose certified
    accuracy ranks them (None: clean accuracy). `certified`: checkpoints are certified while training runs,
    so each is kept until its certification has finished. `score(run_url, step, best_eps)`: the ranked figure
    of a checkpoint's certification report, None when there is none, UnreadableScore when it cannot be used
    (lipnext_scale.certify.report.certified_score); needed when certified checkpoints are ranked."""

    keep_last: int = 3
    keep_best: int = 0
    best_eps: float | None = None
    certified: bool = False
    # Checkpoints waiting for their certification (not started) kept at most; older waiting ones are
    # superseded (recorded "skipped", so prunable): when certification is slower than ckpt.every_steps the
    # disk holds a bounded backlog and certification catches up with the newest. 0: no bound.
    max_waiting: int = 0
    score: Callable[[str, int, float | None], float | None] | None = None

    def __post_init__(self) -> None:
        if self.certified and self.keep_best and self.score is None:
            raise ValueError("Retention(certified=True, keep_best > 0) ranks certification reports: pass "
                             "score=lipnext_scale.certify.report.certified_score")


# --------------------------------------------------------------------------------------------------
# Certification records: `{run}/certify/step_XXXXXXXX/` holds the certification job's outputs (report.json
# last) and `status.json`, which the certifying task rewrites at each change of state.


@dataclass(frozen=True)
class Certification:
    """Where a checkpoint's certification stands. state: "queued" (no record yet), "running", "failed",
    "done" or "skipped". A running one past its deadline was cancelled (timeout) or lost with its process."""

    state: str = "queued"
    attempt: int = 0  # attempts started so far
    attempts: int = 1  # attempts allowed (1 + certify.retries)
    deadline: float = math.inf  # a running attempt is over by then, whatever became of it
    error: str = ""

    def finished(self, now: float) -> bool:
        return (self.state in ("done", "skipped") or (self.state == "failed" and self.attempt >= self.attempts)
                or (self.state == "running" and now > self.deadline))


def read_status(run_url: str, step: int) -> dict[str, Any] | None:
    """Checkpoint `step`'s status.json as written (state, figures, lag, reason, ...); None when none was written.
    Raises ValueError when it is unreadable."""
    url = RunLayout(run_url).status(step)
    data = read_json(url, "its checkpoint is kept until the record is rewritten", CheckpointError,
                     missing_ok=True)  # CheckpointError is a ValueError
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{url} holds {type(data).__name__}, not a JSON object")
    return data


def read_certification(run_url: str, step: int) -> Certification:
    """The record of checkpoint `step`; an unreadable record reads as running with no deadline (kept)."""
    try:
        data = read_status(run_url, step)
        if data is None:
            return Certification()  # nothing written yet: queued
        fields = {k: data[k] for k in ("state", "attempt", "attempts", "error") if k in data}
        return Certification(**fields, deadline=math.inf if data.get("deadline") is None else float(data["deadline"]))
    except (ValueError, TypeError) as e:
        log.warning("the certification record of %s is unreadable (%s): its checkpoint is kept as if still being "
                    "certified", RunLayout(run_url).certification(step), e)
        return Certification(state="running")


def write_certification(run_url: str, step: int, record: Certification, **extra: Any) -> None:
    body = {"step": step, **dataclasses.asdict(record), **extra, "time": time.time()}
    body["deadline"] = None if math.isinf(record.deadline) else record.deadline
    write_json(RunLayout(run_url).status(step), body, CheckpointError, sort_keys=True)


class UnreadableScore(ValueError):
    """A certification report exists but its score cannot be used (cut short, not JSON, the figure missing,
    NaN or infinite): the message says which file and why. Its checkpoint is kept, never ranked."""


def superseded(waiting: list[int], max_waiting: int) -> list[int]:
    """The steps among `waiting` (checkpoints whose certification has not started) beyond the newest
    `max_waiting`, which are skipped; none when max_waiting is 0 (no bound)."""
    ordered = sorted(waiting)
    return ordered[:-max_waiting] if max_waiting > 0 else []


def retained(complete: list[int], scores: dict[int, float | None], unfinished: set[int], keep_last: int,
             keep_best: int) -> set[int]:
    """The steps among `complete` to keep: the newest `keep_last` (at least the newest one), the `keep_best`
    highest finite `scores` (a tie goes to the newer checkpoint; None: no score, not ranked), every one whose
    score is not finite (unreadable: never a reason to delete) and every one in `unfinished` (certification
    not finished)."""
    ordered = sorted(complete)
    keep = set(ordered[-max(keep_last, 1):])
    finite = [s for s in ordered if scores.get(s) is not None and math.isfinite(scores[s])]
    unreadable = {s for s in ordered if scores.get(s) is not None and not math.isfinite(scores[s])}
    ranked = sorted(finite, key=lambda s: (scores[s], s), reverse=True)
    return keep | set(ranked[:keep_best]) | unreadable | (unfinished & set(ordered))
