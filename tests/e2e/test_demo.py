"""`lipnext demo` end to end (a few steps), then `lipnext export` of the checkpoint it leaves.

Runs the console script in a subprocess exactly as a user would, with HOME pointed at a temporary
directory: a new local Ray instance enables token auth and writes ~/.ray/auth_token there, not in the
real HOME.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LIPNEXT = str(Path(sys.executable).with_name("lipnext"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    cmd = [LIPNEXT, "demo", "--out", str(out), "--name", "e2e", "--steps", "4",
           "--set", "train.log_every=2", "--set", "train.eval_batches=1", "--set", "train.progress_bar=false"]
    proc = subprocess.run(cmd, env=env, cwd=str(out), capture_output=True, text=True, timeout=400)
    return proc, out, home


@pytest.mark.timeout(450)
def test_demo_trains_certifies_and_leaves_its_outputs(demo_run):
    proc, out, home = demo_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    run_dir = out / "e2e"
    assert f"Everything is in {run_dir}" in proc.stdout
    assert "prepared the digits shards" in proc.stdout  # first run prepares the data
    assert "clean" in proc.stdout and "36/255" in proc.stdout

    assert (run_dir / "step_00000004" / "meta.json").is_file()
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # the final certification is the certificate of the last checkpoint, made while the run went on (by Ray
    # Train's validation task, with a Ray actor), not a separate pass after training
    assert "certificate of the checkpoint at step 4" in proc.stdout
    report = json.loads((run_dir / "certify" / "step_00000004" / "report.json").read_text())
    assert report["checkpoint"]["url"] == str(run_dir / "step_00000004") and report["timing"]["actors"] == 1
    assert any((run_dir / "tensorboard" / "certify").glob("events.out.tfevents.*"))
    summary = json.loads((run_dir / "demo-summary.json").read_text())
    assert summary["certified_step"] == 4 and summary["report"] == str(run_dir / "certify" / "step_00000004" / "report.json")
    assert summary["clean_accuracy"] == report["clean_accuracy"]
    assert set(summary["certified_accuracy"]) == {"36/255", "72/255", "108/255"}
    # Certified accuracy can never exceed clean accuracy, and shrinks with the radius.
    cra = [summary["certified_accuracy"][e] for e in ("36/255", "72/255", "108/255")]
    assert summary["clean_accuracy"] >= cra[0] >= cra[1] >= cra[2]
    assert (home / ".ray" / "auth_token").is_file()  # Ray's token went to the temporary HOME


@pytest.mark.timeout(450)
def test_export_of_the_demo_checkpoint_loads_as_a_1_lipschitz_model(demo_run, tmp_path):
    import torch

    from lipnext_scale.model import create_model
    from lipnext_scale.model.lipschitz import rigorous_lipschitz_bound
    from lipnext_scale.ckpt import load_exported

    proc, out, _ = demo_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    exported = tmp_path / "exported"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([LIPNEXT, "export", str(out / "e2e" / "step_00000004"), str(exported)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    state_dict, config = load_exported(str(exported))
    assert config["model"]["name"] == "lipnext-tiny" and config["train"]["steps"] == 4
    model = create_model("lipnext-tiny", num_classes=10, image_size=32)
    model.load_state_dict(state_dict)
    assert rigorous_lipschitz_bound(model) <= 1.0 + 1e-3
    again = subprocess.run([LIPNEXT, "export", str(out / "e2e" / "step_00000004"), str(exported)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert torch.equal(load_exported(str(exported))[0]["head.direction"], state_dict["head.direction"])


# A level word of Python's logging (Ray's, Ray Train's, DeepSpeed's, ours), or the E/W severity of Ray's
# core (C++) log lines, "[2026-01-01 12:00:00,000 E 123 456] core_worker.cc:...".
ERROR_OR_WARNING = re.compile(r"\b(ERROR|WARNING)\b|\[\d{4}-\d\d-\d\d [\d:,.]+ [EW] \d+ \d+\]")


@pytest.mark.timeout(450)
def test_a_successful_demo_prints_no_error_or_warning_line(demo_run):
    """Issue 24: the console of a successful run shows our lines and progress; what Ray, Ray Train and
    DeepSpeed log without asking anything of the user (the preemption watcher's ERROR, validations queued at
    every checkpoint, DeepSpeed's untested-optimizer warning, its JIT op builds) stays in Ray's log folder."""
    proc, _, _ = demo_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    flagged = [line for line in output.splitlines() if ERROR_OR_WARNING.search(line)]
    assert not flagged, "\n".join(flagged[:20])
    for noise in ("Running validations for checkpoint", "Staged validations", "built successfully"):
        assert noise not in output, noise
