"""`bench/bench_gpu.py --smoke`: every part of the GPU benchmark runs (tiny, on CPU), so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert summary["certify_vs_forward"] > 0

    # The manifold part steps every manifold matrix of the model it names.
    from lipnext_scale.model import create_model
    from lipnext_scale.model.layers import manifold_parameters

    parts = {p["part"]: p for p in data["parts"] if p["part"] != "train_step"}
    manifold = parts["manifold"]
    matrices = len(manifold_parameters(create_model(manifold["model"], **manifold["overrides"])))
    assert manifold["matrices"] == matrices > 0
    assert parts["polar"]["matrices"] == matrices
    assert summary["polar_all_matrices_s"] == pytest.approx(parts["polar"]["per_matrix_s"] * matrices)

    # The share is measured on one GPU only, against the train step at the manifold part's micro-batch...
    step = next(p for p in data["parts"] if p["part"] == "train_step" and p["micro_batch"] == manifold["micro_batch"])
    share = summary["manifold_share_of_step"]
    assert share["micro_batch"] == manifold["micro_batch"]
    assert share["measured_1_gpu"] == pytest.approx(manifold["step_s"] / (manifold["step_s"] + step["step_s"]))
    assert set(share) == {"micro_batch", "measured_1_gpu"}  # nothing projected among the measured figures
    # ...and any figure for more GPUs sits under a key that says it is a projection, with how it was made.
    projected = summary["manifold_share_of_step_projected"]
    assert "PROJECTION" in projected["how"] and "gather/scatter traffic is not included" in projected["how"]
    assert set(projected["by_gpus"]) == {"8", "32", "64"}
    assert not any("by_gpus" in v for k, v in summary.items() if isinstance(v, dict) and "projected" not in k)
