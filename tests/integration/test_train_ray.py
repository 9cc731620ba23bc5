"""Real Ray Train + DeepSpeed ZeRO-3 on CPU (gloo), 2 workers, lipnext-tiny shrunk, fp32, fixed data order.

Three runs check many things each (every run costs ~20-40 s of start-up on a 2-core machine):
  ref    24 uninterrupted steps: checkpoints (keep-last-3), TensorBoard scalars, orthogonal weights;
  b      1 worker resuming ref's step-12 checkpoint (2 -> 1): its re-partitioned step 12 equals ref's;
  c      2 workers, run dir holding b's step 12 (written at 1 worker) and a truncated step 18: the corrupt
         one is skipped, step 12 resumed (1 -> 2); once c has written its own step 18, a worker is SIGKILLed:
         Ray Train restarts the group, it resumes from that last valid checkpoint, and the final weights and
         optimizer state equal ref's step 24 (exact resume, twice).
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

from processes import descendants_running

from lipnext_scale.config import load_config
from lipnext_scale.model import orthogonality_error
from lipnext_scale.ckpt import CheckpointError, load_manifold_state, load_train_state, validate_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 24
TINY = [
    "model.width=16", "model.depth=2", "data.batch_size=8", "data.loader_processes=0", "data.shuffle_buffer=64",
    "train.precision=fp32", "train.deepspeed=configs/deepspeed/zero3_fp32.json", "train.deterministic_data=true",
    "train.progress_bar=false", "train.num_workers=2", "train.log_every=3", "train.eval_batches=2",
    f"train.steps={STEPS}", "optim.warmup_steps=2", "optim.grad_clip=5.0",
    "ckpt.every_steps=6", "ckpt.keep_last=3",
    "certify.during_training=false",  # certification during training: test_validation_training.py
]


@pytest.fixture(scope="module")
def digits(ray_local, digits_shards):
    return digits_shards()  # the session's digits shards (read only) on the session's local Ray


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _train(digits, storage, name, *extra):
    from lipnext_scale.train.trainer import run_training

    cfg = load_config(None, [*TINY, f"data.train_url={digits}/train-manifest.parquet", f"train.storage={storage}",
                             f"train.name={name}", *extra])
    return run_training(cfg)


def _flat_manifold_state(url: str, names: list[str]) -> dict[str, torch.Tensor]:
    return {f"{k}/{n}": v for n, e in load_manifold_state(url, names).items() for k, v in e.items()}


def _assert_same_state(a_url: str, b_url: str) -> None:
    a, b = load_train_state(a_url), load_train_state(b_url)
    assert a.step == b.step
    names = sorted(a.meta["manifold_owners"])  # moments and Lookahead copies, from each owner's file
    manifold_a, manifold_b = _flat_manifold_state(a_url, names), _flat_manifold_state(b_url, names)
    assert manifold_a, "the manifold optimizer state must be part of the checkpoint"
    for what, x, y in [("weights", a.params, b.params), ("manifold optimizer state", manifold_a, manifold_b),
                       *[(f"optimizer {k}", a.optim[k], b.optim[k]) for k in a.optim]]:
        assert x.keys() == y.keys(), what
        diff = {n: float((x[n] - y[n]).abs().max()) for n in x if not torch.equal(x[n], y[n])}
        assert not diff, f"{what} differ between {a_url} and {b_url}: {diff}"
    assert a.optim_scalars == b.optim_scalars and a.manifold_extra == b.manifold_extra
    assert a.optim, "the Euclidean AdamW state must be part of the checkpoint"


@pytest.fixture(scope="module")
def ref(digits, storage):
    return _train(digits, storage, "ref", f"data.eval_url={digits}/val-manifest.parquet", "train.eval_every=12")


def test_short_run_writes_checkpoints_and_tensorboard_scalars(ref, storage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = storage / "ref"
    assert ref["run_dir"] == str(run) and ref["checkpoint"] == f"{run}/step_{STEPS:08d}"
    assert ref["metrics"]["step"] == STEPS and ref["metrics"]["final"] is True
    # every 6 steps, keep the last 3: step 6 was deleted once step 24 was written
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000012", "step_00000018", "step_00000024"]
    for p in run.glob("step_*"):
        assert validate_checkpoint(str(p))["world_size"] == 2
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss", "train/lr", "train/acc", "train/images_per_s", "train/max_orthogonality_error",
                "estimate/clean_acc", "estimate/cra_36_255", "estimate/cra_108_255", "time/data", "time/forward",
                "time/backward", "time/retraction", "time/checkpoint"]:
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(3, STEPS + 1, 3))
    assert [e.step for e in acc.Scalars("estimate/clean_acc")] == [12, 24]
    assert all(e.value < 1e-4 for e in acc.Scalars("train/max_orthogonality_error"))
    state = load_train_state(ref["checkpoint"])
    assert state.config["train"]["name"] == "ref" and state.data["batches_per_rank"] == STEPS
    for name, w in state.params.items():
        if name.endswith(("stem.weight", ".rot", ".mix")):
            assert orthogonality_error(w) < 1e-4, name


def _worker_pids() -> list[int]:
    """Ray Train worker processes started by this test process's own Ray instance (never anyone else's, such as
    the other xdist worker's or the rehearsal's: they are not this process's descendants)."""
    return [p.pid for p in descendants_running("RayTrainWorker")]


def _kill_a_worker_after(ckpt_dir, killed: list, deadline_s: float = 300) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            validate_checkpoint(str(ckpt_dir))
        except CheckpointError:
            time.sleep(0.02)
            continue
        pids = _worker_pids()
        if pids:
            os.kill(pids[-1], 9)
            killed.append(pids[-1])
        return


@pytest.fixture(scope="module")
def one_worker(ref, digits, storage):
    return _train(digits, storage, "b", "train.num_workers=1", "train.steps=18",
                  f"train.resume={storage}/ref/step_00000012")


def test_two_to_one_worker_resume_keeps_weights_and_optimizer_state(one_worker, storage):
    assert one_worker["metrics"]["resumed_from"] == f"{storage}/ref/step_00000012"
    b12 = storage / "b" / "step_00000012"
    assert validate_checkpoint(str(b12))["world_size"] == 1
    _assert_same_state(f"{storage}/ref/step_00000012", str(b12))
    assert one_worker["checkpoint"] == f"{storage}/b/step_00000018"


@pytest.fixture(scope="module")
def resumed_and_killed(ref, one_worker, digits, storage):
    """Run c (see the module docstring): (its result, the pids killed)."""
    run = storage / "c"
    run.mkdir()
    shutil.copytree(storage / "b" / "step_00000012", run / "step_00000012")  # written by 1 worker
    shutil.copytree(storage / "b" / "step_00000018", run / "step_00000018")
    victim = run / "step_00000018" / "rank-00000.safetensors"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    killed: list[int] = []
    # The truncated step 18 never validates: the killer fires once c has written its own step 18.
    killer = threading.Thread(target=_kill_a_worker_after, args=(run / "step_00000018", killed), daemon=True)
    killer.start()
    out = _train(digits, storage, "c", "train.max_failures=2")
    killer.join(timeout=5)
    return out, killed


def _starts(run) -> list[tuple[int, float]]:
    """(step, resumed?) of every (re)start of a run, from its TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("run/resumed")]


def test_one_to_two_resume_skips_a_truncated_checkpoint_and_matches(resumed_and_killed, ref, storage):
    out, _ = resumed_and_killed
    run = storage / "c"
    assert _starts(run)[0] == (12, 1.0), _starts(run)  # the truncated step 18 skipped, step 12 resumed
    _assert_same_state(ref["checkpoint"], out["checkpoint"])


def test_worker_sigkill_resumes_and_matches_the_uninterrupted_run(resumed_and_killed, ref, storage):
    out, killed = resumed_and_killed
    run = storage / "c"
    assert killed, "no worker was killed: the run ended before its step 18 checkpoint was seen"
    assert _starts(run) == [(12, 1.0), (18, 1.0)], _starts(run)  # restarted from the last valid checkpoint
    assert out["metrics"]["resumed_from"] == f"{run}/step_00000018", out["metrics"]
    assert out["metrics"]["step"] == STEPS
    _assert_same_state(ref["checkpoint"], out["checkpoint"])
