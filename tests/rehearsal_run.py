"""The quick 2B rehearsal (`bench/rehearse_2b.py --quick`) as a background process of the test session.

The rehearsal is the suite's longest run (250-390 s here) and partly waits on cluster events (elastic restarts,
node loss, checkpoints), while the rest of the suite, run serially, leaves a quarter to a half of the 2 cores
idle (Ray start-ups, polls): so the session starts it as soon as the tests are collected (tests/conftest.py)
and runs its checks last (test_rehearsal.py). Measured on one machine: 841 s for the whole suite this way, 657 s
without the rehearsal (the rehearsal alone: ~250 s, measured on a faster machine).

Isolation: the rehearsal's Ray cluster (`ray.cluster_utils.Cluster`) records its address in
`$RAY_TMPDIR/ray/ray_current_cluster`, where any `ray.init()` without an address looks first; the rehearsal
gets its own RAY_TMPDIR, so no other test process can join its cluster, and it cannot join theirs.
It runs in its own session and is stopped with SIGTERM (the rehearsal then shuts its cluster down by handle;
never `ray stop`, which would kill every Ray process of the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from processes import descendants_running, stop_process_group

REPO = Path(__file__).resolve().parents[1]
NODES = 2  # one worker each: the elastic range is 1-2 (the full rehearsal: 3 nodes of 2 workers)
TIMEOUT_S = 850  # from its start; below the suite's 900 s per-test timeout, so a hung run fails with its log

_run: dict = {}


def start() -> None:
    """Starts the rehearsal unless it is running or done in this session."""
    if _run:
        return
    root = Path(tempfile.mkdtemp(prefix="lipnext-rehearsal-"))
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["RAY_TMPDIR"] = ray_tmp
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    log = open(root / "rehearsal.log", "w")  # noqa: SIM115 (closed in wait/stop)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "rehearse_2b.py"), "--quick", "--width", "64", "--nodes", str(NODES),
         "--out", str(root / "rehearsal.json"), "--workdir", str(root / "work")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _run.update(proc=proc, root=root, ray_tmp=ray_tmp, log=log, started=time.monotonic())


def result() -> dict:
    """Waits for the rehearsal (starting it if needed) and returns its results; AssertionError with the log's
    tail when it failed."""
    start()
    proc, root = _run["proc"], _run["root"]
    try:
        proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - _run["started"])))
    except subprocess.TimeoutExpired:
        stop()
        raise AssertionError(f"the rehearsal ran past {TIMEOUT_S} s; log:\n{_tail(root)}") from None
    _run["log"].close()
    assert proc.returncode == 0, f"the rehearsal exited {proc.returncode}; log:\n{_tail(root)}"
    return json.loads((root / "rehearsal.json").read_text())


def stop() -> None:
    """Stops a running rehearsal (SIGTERM: it shuts its cluster down; its process group killed after 60 s) and
    removes its files."""
    if not _run:
        return
    stop_process_group(_run["proc"], grace=60)
    _run["log"].close()
    shutil.rmtree(_run["root"], ignore_errors=True)
    shutil.rmtree(_run["ray_tmp"], ignore_errors=True)


def _tail(root: Path, chars: int = 6000) -> str:
    try:
        return (root / "rehearsal.log").read_text()[-chars:]
    except OSError as e:
        return f"(no log: {e})"


def own_processes(marker: str) -> list:
    """This test process's descendants whose command line contains `marker` (a Ray actor's or worker's class
    name), outside the background rehearsal's process tree (its cluster runs the same kinds of Ray workers and
    actors)."""
    proc = _run.get("proc")
    return descendants_running(marker, skip=set() if proc is None else {proc.pid})
