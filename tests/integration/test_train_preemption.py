"""SIGTERM (preemption) makes every rank stop at the same step and leave a valid checkpoint.

Real DeepSpeed ZeRO-3 on CPU, 2 processes over gloo, without Ray: the training loop runs in each
process's main thread here (as in a plain torchrun launch), where the SIGTERM handler is installed.
This file is also the worker script (`python this_file --worker ...`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

HERE = Path(__file__).resolve()


def _worker(run: str, data: str, steps: int) -> None:
    from lipnext_scale.config import load_config
    from lipnext_scale.train.engine import WorkerRuntime
    from lipnext_scale.train.loop import train_worker
    from lipnext_scale.train.preflight import read_deepspeed_config

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = load_config(None, [
        "model.width=16", "model.depth=1", "data.batch_size=4", "data.loader_processes=0", "train.precision=fp32",
        "train.deepspeed=configs/deepspeed/zero3_fp32.json", "train.progress_bar=false", "train.log_every=1",
        f"train.steps={steps}", "ckpt.every_steps=100000", f"data.train_url={data}"])

    def report(metrics, local_dir, name):
        if local_dir:  # what Ray Train does: merge every rank's files into one storage directory
            shutil.copytree(local_dir, f"{run}/{name}", dirs_exist_ok=True)
        Path(f"{run}/progress-{rank}").write_text(str(metrics["step"]))

    out = train_worker(cfg, read_deepspeed_config(cfg.train.deepspeed), run, WorkerRuntime(rank=rank, world=world),
                       report=report)
    Path(f"{run}/result-{rank}.json").write_text(json.dumps({"step": out["step"]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """A tiny real shard in the pipeline's format (key.png + key.cls): 16 scikit-learn digits images."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("shard") / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(16):
            img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").resize((32, 32))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            for ext, payload in (("png", buf.getvalue()), ("cls", str(int(digits.target[i])).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def test_sigterm_on_one_rank_checkpoints_and_stops_all_ranks(tmp_path, shard):
    from lipnext_scale.ckpt import list_checkpoints, load_train_state

    run = tmp_path / "run"
    run.mkdir()
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen([sys.executable, str(HERE), "--worker", str(run), str(shard), "100000"],
                                      env=env, cwd=HERE.parents[2], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    try:
        deadline = time.monotonic() + 240
        while not (run / "progress-1").exists():  # training has started on rank 1
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                procs[1].stderr.read().decode()[-3000:] if procs[1].poll() is not None else "timeout"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)  # only rank 1 is preempted
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    steps = [json.loads((run / f"result-{r}.json").read_text())["step"] for r in range(2)]
    assert steps[0] == steps[1] and 1 <= steps[0] < 100000
    (last_step, url), = list_checkpoints(str(run))
    assert last_step == steps[0]
    state = load_train_state(url)  # validates every file of both ranks
    assert state.world_size == 2 and state.data["batches_per_rank"] == last_step


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
