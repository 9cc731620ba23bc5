"""The quick 2B rehearsal (`bench/rehearse_2b.py --quick`) as one subprocess serving test_rehearsal.py.

The rehearsal is the suite's longest run (220-390 s here). The suite runs under pytest-xdist with whole files
per worker, longest first (tests/conftest.py), so it starts at once in one worker while the other worker runs
the rest of the suite.

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
from pathlib import Path

from processes import stop_process_group

REPO = Path(__file__).resolve().parents[1]
NODES = 2  # one worker each: the elastic range is 1-2 (the full rehearsal: 3 nodes of 2 workers)
TIMEOUT_S = 850  # below the suite's 900 s per-test timeout, so a hung run fails with its log


def run_rehearsal() -> dict:
    """Runs the rehearsal to its end and returns its results; AssertionError with the log's tail when it
    failed or ran past TIMEOUT_S. Its files and Ray temp folder are removed either way."""
    root = Path(tempfile.mkdtemp(prefix="lipnext-rehearsal-"))
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["RAY_TMPDIR"] = ray_tmp
    try:
        with open(root / "rehearsal.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "bench" / "rehearse_2b.py"), "--quick", "--width", "64", "--nodes",
                 str(NODES), "--out", str(root / "rehearsal.json"), "--workdir", str(root / "work")],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the rehearsal ran past {TIMEOUT_S} s; log:\n{_tail(root)}") from None
            finally:
                stop_process_group(proc, grace=60)  # also on Ctrl-C: the rehearsal shuts its cluster down
        assert proc.returncode == 0, f"the rehearsal exited {proc.returncode}; log:\n{_tail(root)}"
        return json.loads((root / "rehearsal.json").read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _tail(root: Path, chars: int = 6000) -> str:
    try:
        return (root / "rehearsal.log").read_text()[-chars:]
    except OSError as e:
        return f"(no log: {e})"
