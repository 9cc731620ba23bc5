"""A training run's directory, spelled in one place.

    {run}/config.json                        the resolved job config (written at job start)
    {run}/tensorboard/                       the loop's scalars; tensorboard/certify/: the certificates'
    {run}/step_XXXXXXXX/                     a checkpoint (ckpt/format.py says what is inside)
    {run}/certify/step_XXXXXXXX/             its certification while training ran: the job's outputs
                                             (report.json written last) and status.json, the task's record
    {run}/certify/summary.json               every checkpoint's certification, written at the run's end
    {run}/superseded-<time>/                 checkpoints a job set aside (CheckpointManager.set_aside_after)

`step_dir_name` and `step_of` are the one mapping between a step and its directory name.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from lipnext_scale.storage import join_url

STEP_DIR = re.compile(r"^step_(\d{8})$")
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"
CERTIFY_DIR = "certify"
REPORT_FILE = "report.json"  # certify/report.py writes and reads it
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"


def step_dir_name(step: int) -> str:
    """The directory name of step `step`: step_XXXXXXXX (8 digits)."""
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step a directory name (step_XXXXXXXX) stands for; None for any other name."""
    m = STEP_DIR.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory `url` (any fsspec URL; a trailing slash is dropped)."""

    url: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/") or self.url)

    @classmethod
    def of_checkpoint(cls, checkpoint_url: str) -> tuple[RunLayout, int] | None:
        """(the run, the step) of a checkpoint URL `{run}/step_XXXXXXXX`; None for any other URL."""
        url = checkpoint_url.rstrip("/")
        step = step_of(posixpath.basename(url))
        return None if step is None else (cls(url[: -len(posixpath.basename(url))].rstrip("/")), step)

    @property
    def config(self) -> str:
        return join_url(self.url, CONFIG_FILE)

    def tensorboard(self, *sub: str) -> str:
        return join_url(self.url, TENSORBOARD_DIR, *sub)

    def checkpoint(self, step: int) -> str:
        return join_url(self.url, step_dir_name(step))

    @property
    def certify_dir(self) -> str:
        return join_url(self.url, CERTIFY_DIR)

    def certification(self, step: int) -> str:
        """The certification job's output directory for checkpoint `step`."""
        return join_url(self.url, CERTIFY_DIR, step_dir_name(step))

    def report(self, step: int) -> str:
        return join_url(self.certification(step), REPORT_FILE)

    def status(self, step: int) -> str:
        return join_url(self.certification(step), STATUS_FILE)

    @property
    def summary(self) -> str:
        return join_url(self.url, CERTIFY_DIR, SUMMARY_FILE)

    def superseded(self, stamp: str) -> str:
        return join_url(self.url, f"superseded-{stamp}")
