"""`ray job submit --working-dir` of a launcher against a real local Ray head with token authentication on.

The head runs as `ray start --head --block` in its own process group, with HOME pointed at a temporary
directory (so the token lives there, never in the real ~/.ray/auth_token) and RAY_AUTH_MODE=token on
both sides. It is torn down by terminating that process group (by id): `ray stop` would stop every Ray
process on the machine, including other test sessions'.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from processes import stop_process_group

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll until the Jobs API answers (401 without a token counts: it is up and enforcing auth)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with code {head.returncode}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up within {timeout:.0f} s")


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """(dashboard URL, client env) of a fresh token-auth head; the token is only in the temp HOME."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths have a length cap
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    dashboard_port = free_port()
    cmd = [RAY, "start", "--head", "--block", "--dashboard-host", "127.0.0.1",
           "--port", str(free_port()), "--dashboard-port", str(dashboard_port),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port()), "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()), "--num-cpus", "2", "--num-gpus", "0",
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(home / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_dashboard(url, head)
        yield url, env
    finally:
        stop_process_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_submit_without_token_is_refused(token_head, tmp_path):
    url, env = token_head
    wrong = {**env, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": "not-the-token"}
    result = ray_job(["list", "--address", url], wrong, timeout=60)
    assert result.returncode != 0
    assert "AuthenticationError" in result.stderr, result.stderr[-2000:]


def test_ray_job_submit_with_working_dir_runs_a_launcher_on_the_cluster(token_head, tmp_path):
    """`ray job submit --working-dir . -- python data_prep/digits.py`: the checkout is uploaded as the job's
    working directory and the launcher's Ray tasks run on the token-auth cluster. (The training launcher through
    the Jobs API, elastic and multi-node, is tests/integration/test_rehearsal.py's; this test is about the
    upload and the submission, so it runs the cheapest launcher that uses the cluster.)"""
    url, env = token_head
    out = tmp_path / "digits"
    result = ray_job(["submit", "--address", url, "--working-dir", str(REPO),
                      "--runtime-env-json", '{"excludes": ["runs", ".git", "bench/results", "*.egg-info"]}',
                      "--", "python", "data_prep/digits.py", "--out", str(out), "--no-progress"], env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    assert "working_dir" in output or "Uploading package" in output, output[-4000:]  # the checkout went up
    for split in ("train", "val"):
        assert (out / f"{split}-manifest.parquet").is_file(), f"no {split} manifest under the job's --out"
    assert sorted(out.glob("train-*.tar")), "no train shard under the job's --out"
