"""Issue 25's defect, end to end: a training shard given directly (no manifest, no classes.json) holding one
sample labelled 10 for a 10-class model. It passes the job-start check (nothing there lists its labels); the
loader used to yield it and the loss raised IndexError, ending the job. Now the stream skips it (logged with
shard and key) and training reaches its last step. Real DeepSpeed ZeRO-3 on CPU, one gloo rank, no Ray."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
WORKER = """
import json, os, sys
from lipnext_scale.config import load_config
from lipnext_scale.train.engine import WorkerRuntime
from lipnext_scale.train.loop import train_worker
from lipnext_scale.train.preflight import check_data, read_deepspeed_config
run, shard = sys.argv[1], sys.argv[2]
cfg = load_config(None, ["model.width=16", "model.depth=1", "data.batch_size=8", "data.loader_processes=0",
                         "data.shuffle_buffer=4", "train.precision=fp32", "train.progress_bar=false",
                         "train.deepspeed=configs/deepspeed/zero3_fp32.json", "train.log_every=1", "train.steps=4",
                         "ckpt.every_steps=100000", f"data.train_url={shard}"])
check_data(cfg.data, cfg.model)  # the job-start check: nothing lists a loose shard's labels, so it passes
out = train_worker(cfg, read_deepspeed_config(cfg.train.deepspeed), run, WorkerRuntime(), report=lambda *a: False)
open(os.path.join(run, "result.json"), "w").write(json.dumps({"step": out["step"]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_with_label_10(path: Path) -> Path:
    """16 real digits images (labels 0..9) and, among them, one sample labelled 10."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    with tarfile.open(path, "w") as tar:
        for i in range(16):
            img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").resize((32, 32))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            label = 10 if i == 3 else int(digits.target[i])
            for ext, payload in (("png", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def test_a_label_outside_the_model_in_a_loose_shard_does_not_end_training(tmp_path):
    shard = _shard_with_label_10(tmp_path / "my-shard.tar")
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", WORKER, str(run), str(shard)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IndexError" not in done.stderr
    assert json.loads((run / "result.json").read_text())["step"] == 4
    assert f"skipped sample '000003' in shard {shard}: label 10 is outside the model's 10 classes" in done.stderr
