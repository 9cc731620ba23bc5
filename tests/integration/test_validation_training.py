"""Checkpoints certified while training runs, on real Ray Train + DeepSpeed ZeRO-3 (CPU, gloo), with a crash
in the middle of an asynchronous checkpoint upload.

One run: 1 worker, lipnext-tiny shrunk, fp32, 240 steps, a checkpoint every 40 uploaded asynchronously
(ckpt.upload=async), each certified by `certify_job` in its Ray task (certify.actors=0: the demo's e2e test
runs it with an actor) while training goes on, retention keep_last=1 + keep_best=1 by clean accuracy. The
checkpoint files are written in the background and uploaded by Ray Train's own copy, except that during the
first upload of step 120 the uploader copies two of the files and then SIGKILLs its own process, the
worker, as a crash mid-upload would; Ray Train restarts the worker (train.max_failures=1). Checked:
  - the restart resumed from step 80, the previous checkpoint (retention kept it although keep_last=1: the
    half-uploaded step 120 was not complete), the half-uploaded one was set aside, step 120 written again;
  - every checkpoint has its certificate (certify/step_X/report.json, of that very checkpoint's weights,
    all 300 held-out samples) and its figures in TensorBoard at its step;
  - certification ran while training did: one started before the final checkpoint was written (a checkpoint
    whose report Ray lost with the killed worker is certified after training, by `finish`);
  - retention: the newest checkpoint plus the best by clean accuracy remain, and every certification
    finished (none lost its checkpoint to pruning while queued or running);
  - the killed worker's local staging directory (step 120's files) is gone: the restarted worker removed it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS, EVERY, CRASH_AT = 240, 40, "step_00000120"
TINY = ["model.width=16", "model.depth=1", "data.batch_size=8", "data.loader_processes=0", "data.shuffle_buffer=64",
        "train.precision=fp32", "train.deepspeed=configs/deepspeed/zero3_fp32.json", "train.progress_bar=false",
        "train.num_workers=1", "train.log_every=20", "train.eval_batches=1", "optim.warmup_steps=0",
        f"train.steps={STEPS}", f"ckpt.every_steps={EVERY}", "ckpt.keep_last=1", "ckpt.keep_best=1",
        'ckpt.best_metric="clean"', "ckpt.upload=async", "certify.actors=0", "train.max_failures=1",
        "certify.max_waiting=0"]  # every checkpoint certified, however far certification falls behind


def _upload_or_die(checkpoint, name: str):
    """Ray Train's `checkpoint_upload_fn` for this run (called once the staging directory is written): Ray's
    own copy into the run directory, except that two files into the first upload of step 120 it SIGKILLs
    its own process, the worker."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    crashed = f"{storage.experiment_fs_path}/crashed-once"
    if name != CRASH_AT or os.path.exists(crashed):
        return storage.persist_current_checkpoint(checkpoint, name)
    dest = f"{storage.experiment_fs_path}/{name}"
    os.makedirs(dest, exist_ok=True)
    for file in sorted(os.listdir(checkpoint.path))[:2]:
        shutil.copyfile(os.path.join(checkpoint.path, file), os.path.join(dest, file))
    with open(crashed, "w") as f:
        f.write(checkpoint.path)  # its staging directory, which the restarted worker removes
    os.kill(os.getpid(), signal.SIGKILL)


def _entry(config: dict) -> None:
    """trainer._worker_entry, with this run's uploader."""
    import ray.train
    import torch

    from lipnext_scale.config import config_from_dict
    from lipnext_scale.train.engine import WorkerRuntime
    from lipnext_scale.train.loop import train_worker
    from lipnext_scale.train.validation import ray_report

    cfg = config_from_dict(config["job"])
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    train_worker(cfg, config["deepspeed"], config["run_url"],
                 WorkerRuntime(rank=ctx.get_world_rank(), world=ctx.get_world_size()),
                 report=ray_report(cfg, upload_fn=_upload_or_die))


@pytest.fixture(scope="module")
def run(ray_local, digits_shards, tmp_path_factory):
    from ray import cloudpickle
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lipnext_scale.config import config_to_dict, load_config
    from lipnext_scale.train.preflight import check_job
    from lipnext_scale.certify.during_training import check_validation, finish
    from lipnext_scale.train.tb import ScalarLog
    from lipnext_scale.train.validation import validation_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's processes cannot import test modules
    digits = digits_shards()
    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [*TINY, f"data.train_url={digits}/train-manifest.parquet",
                             f"data.eval_url={digits}/val-manifest.parquet", f"train.storage={storage}",
                             "train.name=certified"])
    job = check_job(cfg)
    check_validation(cfg)
    trainer = TorchTrainer(
        _entry, train_loop_config={"job": config_to_dict(cfg), "deepspeed": job.deepspeed, "run_url": job.run_url},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        validation_config=validation_config(cfg, job.run_url),
        run_config=RunConfig(name="certified", storage_path=str(storage), failure_config=FailureConfig(max_failures=1),
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}}))
    result = trainer.fit()
    summary = finish(cfg, job.run_url, scalar_log=ScalarLog)  # as the trainer wires it
    return {"result": result, "summary": summary, "dir": storage / "certified"}


def test_a_crash_mid_upload_resumes_from_the_previous_checkpoint(run):
    from lipnext_scale.ckpt import validate_checkpoint

    rundir, metrics = run["dir"], run["result"].metrics
    assert (rundir / "crashed-once").is_file(), "the uploader never crashed"
    assert metrics["resumed_from"] == f"{rundir}/step_00000080" and metrics["step"] == STEPS
    aside = list(rundir.glob(f"superseded-*/{CRASH_AT}"))
    assert len(aside) == 1 and len(list(aside[0].iterdir())) == 2  # the two files copied before the crash
    assert validate_checkpoint(str(rundir / f"step_{STEPS:08d}"))["step"] == STEPS


def test_every_checkpoint_is_certified_while_training_runs(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lipnext_scale.ckpt import read_meta

    rundir, summary = run["dir"], run["summary"]
    steps = list(range(EVERY, STEPS + 1, EVERY))
    rows = {r["step"]: r for r in summary["checkpoints"]}
    assert sorted(rows) == steps and all(r["state"] == "done" for r in rows.values()), rows
    for step in steps:
        report = json.loads((rundir / "certify" / f"step_{step:08d}" / "report.json").read_text())
        assert report["checkpoint"]["url"] == f"{rundir}/step_{step:08d}" and report["samples"] == 300
        assert report["lipschitz"]["lipschitz_used"] <= 1 + 1e-4
        assert rows[step]["figures"]["certify/clean_acc"] == report["clean_accuracy"]
        assert (rundir / "certify" / f"step_{step:08d}" / "certified_accuracy.png").is_file()
    assert summary["latest"]["step"] == STEPS
    assert run["result"].metrics["certify/clean_acc"] == rows[STEPS]["figures"]["certify/clean_acc"]  # merged by Ray
    acc = EventAccumulator(str(rundir / "tensorboard" / "certify"))
    acc.Reload()
    # one value per checkpoint at its step (each certification writes its own event file; TensorBoard orders
    # a run's files by name, i.e. by the second they were opened and then the pid, so not always by step)
    for tag in ("certify/clean_acc", "certify/cra_36_255", "certify/cra_108_255"):
        assert sorted(e.step for e in acc.Scalars(tag)) == steps, tag
    # overlap: a certification started before training wrote its last checkpoint
    started = {s: json.loads((rundir / "certify" / f"step_{s:08d}" / "status.json").read_text())["started"]
               for s in steps}
    ended = read_meta(str(rundir / f"step_{STEPS:08d}"))["time"]
    assert min(started.values()) < ended, (started, ended)


def test_retention_keeps_the_newest_and_the_best_certified(run):
    from lipnext_scale.ckpt.retention import retained

    rundir, summary = run["dir"], run["summary"]
    clean = {r["step"]: r["figures"]["certify/clean_acc"] for r in summary["checkpoints"]}
    left = sorted(int(p.name[5:]) for p in rundir.glob("step_*"))
    assert set(left) == retained(sorted(clean), clean, set(), 1, 1), (left, clean)
    best = max(clean, key=lambda s: (clean[s], s))
    assert summary["best"]["step"] == best and run["result"].metrics["step"] == STEPS
    for step in left:  # what is kept is what was certified: the same weights
        from lipnext_scale.certify.model_loading import load_model

        report = json.loads((rundir / "certify" / f"step_{step:08d}" / "report.json").read_text())
        assert load_model(str(rundir / f"step_{step:08d}")).weights_sha256 == report["checkpoint"]["weights_sha256"]


def test_the_killed_workers_staging_directory_is_removed_by_the_restarted_worker(run):
    staging = (run["dir"] / "crashed-once").read_text()
    assert os.path.basename(staging).startswith("lipnext-ckpt-"), staging
    assert not os.path.exists(staging), f"{staging} was left behind by the killed worker"
