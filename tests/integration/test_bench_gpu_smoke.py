"""`bench/bench_gpu.py --smoke`: every part of the GPU benchmark runs (tiny, on CPU), so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_gpu_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {p["part"] for p in data["parts"]} == {"train_step", "manifold", "polar", "certify"}
    assert all(p["status"] == "ok" for p in data["parts"])
    summary = data["summary"]
    assert summary["lipnext-tiny_best"]["images_per_s"] > 0
    shares = summary["manifold_share_of_step"]["by_gpus"]
    assert shares["1"] > shares["8"] > shares["64"] > 0  # the owner split divides the manifold work
    assert summary["certify_vs_forward"] > 0 and summary["polar_all_matrices_s"] > 0
