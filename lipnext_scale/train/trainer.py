"""Ray Train wiring: check the job at start, then one TorchTrainer worker per GPU (or CPU slot).

`run_training(cfg)` is what every entry point calls (`lipnext train`, `lipnext demo`, the launchers).
Everything that can be checked before workers start is checked first (`preflight.check_job`); then the
run directory gets its resolved `config.json`, and Ray Train runs `loop.train_worker` on every rank.
Checkpoints are found, kept and pruned by `lipnext_scale.ckpt.CheckpointManager`, not by Ray Train; each is
certified while training runs (`certify/during_training.py`), handed to Ray Train's validation by
`train/validation.py`: this module is the composition root that wires the two.
"""

from __future__ import annotations

import logging
from typing import Any

from lipnext_scale.certify import during_training
from lipnext_scale.ckpt import CheckpointManager
from lipnext_scale.config import JobConfig, config_from_dict, config_to_dict
from lipnext_scale.errors import RunFailed
from lipnext_scale.runtime import connect_ray
from lipnext_scale.train import validation
from lipnext_scale.train.preflight import check_job, write_run_config
from lipnext_scale.train.tb import ScalarLog

log = logging.getLogger(__name__)


class TrainingDiverged(RunFailed, RuntimeError):
    """The loss or the weights became NaN/Inf; no checkpoint of them was written. The message says where
    the last good checkpoint is and what to change."""


def _worker_entry(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker (in a thread of the worker actor)."""
    import ray.train
    import torch

    from lipnext_scale.train.engine import WorkerRuntime
    from lipnext_scale.train.loop import train_worker

    cfg = config_from_dict(config["job"])
    torch.set_num_threads(cfg.train.cpus_per_worker)
    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    device = "cpu"
    if config["use_gpu"]:
        device = f"cuda:{ray.train.torch.get_device().index or 0}"
        torch.cuda.set_device(device)

    report = validation.ray_report(cfg)  # ckpt.upload's mode; each checkpoint certified while training runs

    def preempted() -> bool:
        return ray.train.get_preemption_info() is not None

    runtime = WorkerRuntime(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
                            node=ctx.get_node_rank(), preempted=preempted)
    train_worker(cfg, config["deepspeed"], config["run_url"], runtime, report=report, start=config["start"])


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every `report` (the whole metrics dict) and every checkpoint at INFO from every
    worker; our progress bar, TensorBoard and checkpoint warnings already say this. Its loggers are
    named by file path (`logging.getLogger(__file__)`), hence the match on the package path."""
    for name in list(logging.root.manager.loggerDict):
        if "ray/train/" in name or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)


def ray_train_workers(tc) -> int | tuple[int, int]:
    """ScalingConfig's num_workers: a count, or (fewest, most), which selects Ray Train's elastic policy: it
    starts with as many workers as the cluster holds, restarts at the size left after a node loss (a failure:
    train.max_failures must allow it) and resizes when the count it could run changes (every
    train.resize_check_s); each start resumes from the newest checkpoint (train/resume.py)."""
    low, high = tc.worker_range
    return low if low == high else (low, high)


def trains_on_gpu(setting, ray_module) -> bool:
    """train.use_gpu resolved: "auto" trains on GPUs when the Ray cluster has them."""
    if setting == "auto":
        return ray_module.cluster_resources().get("GPU", 0) >= 1
    return bool(setting)


def worker_resources(tc, use_gpu: bool) -> dict[str, float]:
    """What one training worker takes from a node (as ScalingConfig below asks): CPUs, and a GPU on GPUs."""
    return {"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}


def run_training(cfg: JobConfig, *, ray_address: str | None = None) -> dict[str, Any]:
    """Train with Ray Train + DeepSpeed ZeRO-3; returns {"metrics", "checkpoint", "run_dir"}. Raises
    ConfigError at start for a bad job, TrainingDiverged when the run stopped on NaN/Inf."""
    job = check_job(cfg)
    during_training.check_validation(cfg)
    cfg.train.check_global_batch(cfg.data.batch_size)  # every allowed world size splits it evenly
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    CheckpointManager(job.run_url).set_aside_after(job.start)
    _forget_ray_checkpoint_list(job.run_url)
    write_run_config(cfg, job.run_url)
    connect_ray(ray_address)
    use_gpu = trains_on_gpu(cfg.train.use_gpu, ray)
    tc = cfg.train
    env = {"OMP_NUM_THREADS": str(tc.cpus_per_worker)}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator + gloo: tests, demo, CPU clusters
    storage, name = job.run_url.rsplit("/", 1)
    certify = validation.validation_config(cfg, job.run_url)  # a Ray task per checkpoint, beside training
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"job": config_to_dict(cfg), "deepspeed": job.deepspeed, "run_url": job.run_url,
                           "use_gpu": use_gpu, "start": job.start.url if job.start else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=ray_train_workers(tc), use_gpu=use_gpu,  # one GPU per worker
                                     resources_per_worker={"CPU": tc.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=tc.resize_check_s),
        # No Ray checkpoint retention: the CheckpointManager prunes (ckpt.keep_last, keep_best) after each save.
        validation_config=certify,
        run_config=RunConfig(name=name, storage_path=storage, worker_runtime_env={"env_vars": env},
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             # Ray Train's own INFO lines (each validation queued and run, each report) go
                             # to its log files under Ray's log folder, not the console
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    if metrics.get("diverged"):
        raise TrainingDiverged(metrics["diverged"])
    checkpoint = f"{job.run_url}/{result.checkpoint.path.rstrip('/').rsplit('/', 1)[-1]}" if result.checkpoint else None
    # what Ray missed certified, final prune, summary.json
    certified = during_training.finish(cfg, job.run_url, scalar_log=ScalarLog)
    metrics.update(during_training.summary_metrics(certified))
    return {"metrics": metrics, "checkpoint": checkpoint, "run_dir": job.run_url, "certified": certified}


def _forget_ray_checkpoint_list(run_url: str) -> None:
    """Ray Train lists every checkpoint it was reported in `{run}/checkpoint_manager_snapshot.json` and, on
    the next `fit` of the run, refuses to start when one of them is gone; the CheckpointManager prunes them
    (and chose this job's start point already), so Ray's list of an earlier job is dropped."""
    from lipnext_scale.storage import join_url, remove

    remove(join_url(run_url, "checkpoint_manager_snapshot.json"), missing_ok=True)
