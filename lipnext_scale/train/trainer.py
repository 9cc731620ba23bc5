"""Ray Train wiring: check the job at start, then one TorchTrainer worker per GPU (or CPU slot).

`run_training(cfg)` is what every entry point calls (`lipnext train`, `lipnext demo`, the launchers).
Everything that can be checked before workers start is checked here, so a wrong key, an unreachable
data URL or an unwritable storage URL fails in seconds with a message naming it, not after start-up.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec

from lipnext_scale.config import ConfigError, JobConfig, config_from_dict, config_to_dict
from lipnext_scale.train.checkpoint import CheckpointError, list_checkpoints, validate_checkpoint
from lipnext_scale.train.metrics import deepspeed_config

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]


def run_url_of(cfg: JobConfig) -> str:
    """`{storage}/{name}`; a local storage path is made absolute (workers may run elsewhere)."""
    storage = cfg.train.storage
    if "://" not in storage:
        storage = os.path.abspath(os.path.expanduser(storage))
    elif storage.startswith("file://"):
        storage = storage[len("file://"):]
    return f"{storage.rstrip('/')}/{cfg.train.name}"


def read_deepspeed_config(path: str) -> dict[str, Any]:
    """The DeepSpeed JSON: relative paths are tried from the working directory, then the repository."""
    candidates = [Path(path)] if Path(path).is_absolute() else [Path.cwd() / path, _REPO_ROOT / path]
    for p in candidates:
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"train.deepspeed={path!r}: {p} is not valid JSON ({e})") from None
    raise ConfigError(f"train.deepspeed={path!r} not found (looked in {', '.join(str(c) for c in candidates)}); "
                      "use one of configs/deepspeed/*.json")


def _check_storage(run_url: str) -> None:
    """Create the run directory and write + delete a probe file, so an unwritable storage fails now."""
    try:
        fs, path = fsspec.core.url_to_fs(run_url)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path}/.write-probe-{uuid.uuid4().hex[:8]}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # any backend error: credentials, missing bucket, permissions, bad protocol
        raise ConfigError(f"train.storage: cannot write the run directory {run_url!r} ({type(e).__name__}: {e}); "
                          "give a writable local path or a reachable s3:// / gs:// URL with credentials") from None


def _check_data(cfg: JobConfig) -> None:
    from lipnext_scale.data.shards import resolve_shards

    if not cfg.data.train_url:
        raise ConfigError("data.train_url is empty: set it to a shard pattern or a train-manifest.parquet URL, "
                          "e.g. --set data.train_url=data/digits/train-manifest.parquet")
    for key, split in (("train_url", "train"), ("eval_url", "val")):
        url = getattr(cfg.data, key)
        if not url:
            continue
        try:
            shards = resolve_shards(url, split=split)
        except Exception as e:
            raise ConfigError(f"data.{key}={url!r} is not usable: {e}") from None
        if not shards:
            raise ConfigError(f"data.{key}={url!r} resolves to no shards; prepare the data set first")


def _check_resume(cfg: JobConfig, run_url: str) -> None:
    resume = cfg.train.resume
    if resume == "none" and list_checkpoints(run_url):
        raise ConfigError(f"train.resume=none but {run_url} already has checkpoints; pick a new train.name, "
                          "delete the run directory, or use train.resume=auto to continue it")
    if resume not in ("auto", "none"):
        try:
            validate_checkpoint(resume)
        except CheckpointError as e:
            raise ConfigError(f"train.resume={resume!r}: {e}") from None


def check_job(cfg: JobConfig) -> tuple[str, dict[str, Any]]:
    """Every start-time check; returns (run URL, DeepSpeed config base)."""
    from lipnext_scale.model import get_spec

    cfg.validate()
    try:
        get_spec(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
                 **cfg.model.overrides())
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"[model]: {e.args[0] if e.args else e}") from None
    ds_base = read_deepspeed_config(cfg.train.deepspeed)
    deepspeed_config(ds_base, cfg, cfg.train.num_workers)  # raises on a non-ZeRO-3 file
    _check_data(cfg)
    run_url = run_url_of(cfg)
    _check_storage(run_url)
    _check_resume(cfg, run_url)
    return run_url, ds_base


def _worker_entry(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker (in a thread of the worker actor)."""
    import ray.train
    import torch

    from lipnext_scale.train.loop import train_worker

    cfg = config_from_dict(config["job"])
    torch.set_num_threads(cfg.train.cpus_per_worker)
    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    device = "cpu"
    if config["use_gpu"]:
        device = f"cuda:{ray.train.torch.get_device().index or 0}"
        torch.cuda.set_device(device)

    def report(metrics: dict[str, Any], local_dir: str | None, name: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(local_dir) if local_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def preempted() -> bool:
        return ray.train.get_preemption_info() is not None

    train_worker(cfg, config["deepspeed"], config["run_url"], ctx.get_world_rank(), ctx.get_world_size(),
                 report=report, preempted=preempted, device=device)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every `report` (the whole metrics dict) and every checkpoint at INFO from every
    worker; our progress bar, TensorBoard and checkpoint warnings already say this. Its loggers are
    named by file path (`logging.getLogger(__file__)`), hence the match on the package path."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if "ray/train/" in name or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _use_gpu(setting, ray_module) -> bool:
    if setting == "auto":
        return ray_module.cluster_resources().get("GPU", 0) >= 1
    return bool(setting)


def run_training(cfg: JobConfig, *, ray_address: str | None = None) -> dict[str, Any]:
    """Train with Ray Train + DeepSpeed ZeRO-3; returns {"metrics", "checkpoint", "run_dir"}."""
    run_url, ds_base = check_job(cfg)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=ray_address, dashboard_host="127.0.0.1")
    use_gpu = _use_gpu(cfg.train.use_gpu, ray)
    tc = cfg.train
    env = {"OMP_NUM_THREADS": str(tc.cpus_per_worker)}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator + gloo: tests, demo, CPU clusters
    storage, name = run_url.rsplit("/", 1)
    _atomic_put(run_url, "config.json", json.dumps(config_to_dict(cfg), indent=2).encode())
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"job": config_to_dict(cfg), "deepspeed": ds_base, "run_url": run_url, "use_gpu": use_gpu},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,  # use_gpu: one GPU per worker
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, worker_runtime_env={"env_vars": env},
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.ckpt.keep_last),
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    result = trainer.fit()
    checkpoint = f"{run_url}/{result.checkpoint.path.rstrip('/').rsplit('/', 1)[-1]}" if result.checkpoint else None
    return {"metrics": dict(result.metrics or {}), "checkpoint": checkpoint, "run_dir": run_url}


def _atomic_put(run_url: str, name: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(run_url)
    tmp = f"{path}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, f"{path}/{name}")
