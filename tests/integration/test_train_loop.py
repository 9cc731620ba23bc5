"""The training loop itself, on real DeepSpeed ZeRO-3 (CPU, gloo, one rank per process, no Ray):

  syncs       host reads (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, ...) and all-reduces, counted per
              optimizer step by wrappers around torch's own methods and attributed to the first caller
              outside torch: the loop (train/, ckpt/) makes none on a step that is not a log or checkpoint step.
              (Other components' own reads, e.g. the optimizer's NaN-skip decision, are counted, not asserted.)
  nan-loss    the loss turns NaN at step 3: the run stops at the next sync step (a checkpoint-only step,
              4 < 3 + log_every) with a message naming the last good checkpoint, and writes no checkpoint after it.
  nan-weights a weight turns NaN right before a checkpoint step whose loss was still finite: the
              CheckpointManager refuses to write it, the run stops the same way.
Every rank starts with an empty TORCH_EXTENSIONS_DIR, as on a fresh machine: none compiles or loads DeepSpeed's
shared-memory inference kernel (train/engine.py's init_distributed).
This file is also the worker script (`python this_file --worker MODE RUN SHARD OUT`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_preemption import shard  # noqa: E402,F401  (the same real 16-image digits shard)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

HERE = Path(__file__).resolve()
MODES = {  # mode: (steps, log_every, ckpt.every_steps)
    "syncs": (6, 3, 100),
    "nan-loss": (10, 5, 2),
    "nan-weights": (10, 5, 2),
}

# ------------------------------------------------------------------ worker side

def _origin(skip: str) -> str:
    """The first caller outside torch and this file: "lipnext_scale/train/metrics.py", "deepspeed", ..."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name != skip and f"{os.sep}torch{os.sep}" not in name:
            break
        f = f.f_back
    if f is None:
        return "?"
    name = f.f_code.co_filename
    if "lipnext_scale" + os.sep in name:
        return "lipnext_scale/" + name.split("lipnext_scale" + os.sep, 1)[1].replace(os.sep, "/")
    if "site-packages" + os.sep in name:
        return name.split("site-packages" + os.sep, 1)[1].split(os.sep, 1)[0]
    return name


def _install_counters(events: dict, clock: list[int]) -> None:
    """Count host reads and all-reduces per optimizer step (clock[0]: steps started so far)."""
    import torch
    import torch.distributed as dist

    def wrap(owner, attr: str, kind: str) -> None:
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            events[kind][clock[0]][_origin(__file__)] += 1
            return original(*args, **kwargs)

        setattr(owner, attr, counted)

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        wrap(torch.Tensor, attr, "reads")
    wrap(torch.cuda, "synchronize", "reads")
    wrap(dist, "all_reduce", "all_reduce")


def _worker(mode: str, run: str, shard: str, out: str) -> None:
    import torch

    import lipnext_scale.train.engine as engine_module
    import lipnext_scale.train.loop as loop
    from lipnext_scale.config import load_config
    from lipnext_scale.train.engine import WorkerRuntime
    from lipnext_scale.train.preflight import read_deepspeed_config

    steps, log_every, every = MODES[mode]
    cfg = load_config(None, [
        "model.width=16", "model.depth=1", "data.batch_size=4", "data.loader_processes=0", "train.precision=fp32",
        "train.deepspeed=configs/deepspeed/zero3_fp32.json", "train.progress_bar=false", "train.grad_accum=2",
        f"train.log_every={log_every}", f"train.steps={steps}", f"ckpt.every_steps={every}", "ckpt.keep_last=5",
        f"data.train_url={shard}", "optim.warmup_steps=0"])
    clock = [0]
    events = {"reads": defaultdict(lambda: defaultdict(int)), "all_reduce": defaultdict(lambda: defaultdict(int))}
    train_step = loop._train_step

    def counted_step(built, *args, **kwargs):
        clock[0] += 1
        train_step(built, *args, **kwargs)
        if mode == "nan-weights" and clock[0] == 4:  # after step 4's last update, before its checkpoint
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            bias = built.model.head.bias
            safe_set_local_fp32_param(bias, torch.full_like(safe_get_local_fp32_param(bias), float("nan")))

    loop._train_step = counted_step
    if mode == "nan-loss":
        certified_loss = engine_module.certified_loss

        def poisoned(*args, **kwargs):
            loss = certified_loss(*args, **kwargs)
            return loss * float("nan") if clock[0] >= 3 else loss

        engine_module.certified_loss = poisoned
    if mode == "syncs":
        _install_counters(events, clock)

    def report(metrics, local_dir, name):
        if local_dir:  # what Ray Train does: copy every rank's files into the run directory
            import shutil

            shutil.copytree(local_dir, f"{run}/{name}", dirs_exist_ok=True)

    result = loop.train_worker(cfg, read_deepspeed_config(cfg.train.deepspeed), run, WorkerRuntime(), report=report)
    from deepspeed.comm import comm

    Path(out).write_text(json.dumps({"result": {k: v for k, v in result.items() if isinstance(v, (int, float, str))},
                                     "events": {k: {s: dict(c) for s, c in v.items()} for k, v in events.items()},
                                     "shm_kernel_loaded": comm.cdb.shm_comm_op is not None}))


# ------------------------------------------------------------------ test side

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(shard, tmp_path_factory):
    """All modes at once (one process each), results by mode."""
    base = tmp_path_factory.mktemp("loop")
    extensions = base / "torch_extensions"  # empty: what a fresh machine has; anything JIT-built lands here
    procs = {}
    for mode in MODES:
        run = base / mode
        run.mkdir()
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "TORCH_EXTENSIONS_DIR": str(extensions)}
        log = open(base / f"{mode}.log", "w")
        procs[mode] = (run, subprocess.Popen(
            [sys.executable, str(HERE), "--worker", mode, str(run), str(shard), str(base / f"{mode}.json")],
            env=env, cwd=HERE.parents[2], stdout=log, stderr=subprocess.STDOUT))
    out = {}
    for mode, (run, proc) in procs.items():
        try:
            proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode != 0:
            pytest.fail(f"{mode} worker failed:\n{(base / f'{mode}.log').read_text()[-4000:]}")
        out[mode] = {"run": run, **json.loads((base / f"{mode}.json").read_text())}
    out["built"] = sorted(p.name for p in extensions.glob("*")) if extensions.exists() else []
    return out


def test_a_rank_starts_without_compiling_anything(runs):
    """DeepSpeed's CPU backend JIT-compiles its shared-memory inference all-reduce kernel at start (~50 core-s of
    g++ on a fresh machine) unless told it is unavailable; training never uses it (train/engine.py)."""
    assert not any(runs[mode]["shm_kernel_loaded"] for mode in MODES), {m: runs[m]["shm_kernel_loaded"] for m in MODES}
    assert runs["built"] == [], runs["built"]


def test_no_host_sync_or_collective_of_the_loop_between_log_steps(runs):
    steps, log_every, _ = MODES["syncs"]
    events = runs["syncs"]["events"]
    log_steps = {s for s in range(1, steps + 1) if s % log_every == 0}
    # The model's input check is off in training (the loss is checked on sync steps). The optimizer keeps two
    # per step (the NaN-skip decision, the Euclidean optimizer's CPU step counter); FastExp chooses its branches
    # on the device (it read "any matrix on the exact branch?" per call and shape group: 6 in all before).
    ours = ("lipnext_scale/train/", "lipnext_scale/ckpt/", "lipnext_scale/model/")
    for step in set(range(1, steps + 1)) - log_steps:
        optim_reads = sum(v for k, v in events["reads"].get(str(step), {}).items()
                          if k.startswith("lipnext_scale/optim/"))
        assert optim_reads <= 2, (step, sorted(events["reads"].get(str(step), {}).items()))
    for step in range(1, steps + 1):
        reads = events["reads"].get(str(step), {})
        reduces = events["all_reduce"].get(str(step), {})
        loop_reads = {k: v for k, v in reads.items() if k.startswith(ours)}
        loop_reduces = {k: v for k, v in reduces.items() if k.startswith(ours)}
        if step in log_steps:  # the counters do see the loop: its one agreement per log step
            assert loop_reduces.get("lipnext_scale/train/metrics.py", 0) >= 1, (step, reduces)
            assert loop_reads, (step, reads)
        else:
            assert loop_reads == {} and loop_reduces == {}, (step, loop_reads, loop_reduces)
    assert runs["syncs"]["result"]["step"] == steps and "diverged" not in runs["syncs"]["result"]


@pytest.mark.parametrize("mode", ["nan-loss", "nan-weights"])
def test_nan_stops_the_run_without_a_checkpoint_of_nan_weights(runs, mode):
    from lipnext_scale.ckpt import list_checkpoints, load_train_state

    run = runs[mode]["run"]
    result = runs[mode]["result"]
    _, log_every, _ = MODES[mode]
    assert result["step"] == 4 < 3 + log_every  # stopped at the first sync step after the NaN
    message = result["diverged"]
    assert message.startswith("training diverged: ") and f"{run}/step_00000002" in message, message
    assert "no checkpoint of these weights is written" in message
    assert ("loss became nan" if mode == "nan-loss" else "holds NaN/Inf") in message, message
    assert [s for s, _ in list_checkpoints(str(run))] == [2]
    state = load_train_state(f"{run}/step_00000002")
    assert all(bool(t.isfinite().all()) for t in state.params.values())


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(*sys.argv[2:6])
