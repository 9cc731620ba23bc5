"""Everything a training job can check before Ray starts a worker, and before anything is written.

A wrong key, an unreachable data URL, labels the model has no class for, an unwritable storage URL or a
resume checkpoint of another model fails in seconds with a message naming the thing and the fix, not
inside a worker after start-up. `check_job(cfg)` runs them all and returns what the job starts with.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipnext_scale.ckpt import CheckpointError, CheckpointManager, ExportError, StartPoint, model_kwargs
from lipnext_scale.ckpt.layout import RunLayout
from lipnext_scale.config import ConfigError, DataConfig, JobConfig, ModelConfig, config_to_dict
from lipnext_scale.storage import atomic_write_bytes, is_file, join_url, makedirs, read_json, remove, write_json
from lipnext_scale.train.engine import deepspeed_config

_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class JobStart:
    run_url: str
    deepspeed: dict[str, Any]  # the DeepSpeed JSON as read (ZeRO settings); the job's values are set per worker
    start: StartPoint | None  # the checkpoint the job starts from, validated


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
        if is_file(str(p), ConfigError):
            return read_json(str(p), f"fix train.deepspeed={path!r} or use one of configs/deepspeed/*.json",
                             ConfigError)
    raise ConfigError(f"train.deepspeed={path!r} not found (looked in {', '.join(str(c) for c in candidates)}); "
                      "use one of configs/deepspeed/*.json")


def check_storage(run_url: str) -> None:
    """Create the run directory and write + delete a probe file, so an unwritable storage fails now."""
    probe = join_url(run_url, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(run_url, ConfigError)
        atomic_write_bytes(probe, b"ok", ConfigError)
        remove(probe, ConfigError)
    except Exception as e:  # any backend error: credentials, missing bucket, permissions, bad protocol
        raise ConfigError(f"train.storage: cannot write the run directory {run_url!r} ({type(e).__name__}: {e}); "
                          "give a writable local path or a reachable s3:// / gs:// URL with credentials") from None


def check_data(data: DataConfig, model: ModelConfig) -> None:
    """The data URLs resolve to shards, and their labels fit the model's classes (what certify checks too)."""
    from lipnext_scale.data.manifest import dataset_classes
    from lipnext_scale.data.shards import resolve_shards

    if not data.train_url:
        raise ConfigError("data.train_url is empty: set it to a shard pattern or a train-manifest.parquet URL, "
                          "e.g. --set data.train_url=data/digits/train-manifest.parquet")
    for key, split in (("train_url", "train"), ("eval_url", "val")):
        url = getattr(data, key)
        if not url:
            continue
        try:
            shards = resolve_shards(url, split=split)
            declared, present, where = dataset_classes(shards) if shards else (None, None, "")
        except Exception as e:
            raise ConfigError(f"data.{key}={url!r} is not usable: {e}") from None
        if not shards:
            raise ConfigError(f"data.{key}={url!r} resolves to no shards; prepare the data set first")
        if present is not None and present > model.num_classes:  # a worker would crash on such a label
            raise ConfigError(f"data.{key}={url!r}: labels go up to {present - 1} ({where}) but "
                              f"model.num_classes={model.num_classes}; set model.num_classes={max(declared or 0, present)}")
        if declared is not None and declared != model.num_classes:
            raise ConfigError(f"data.{key}={url!r}: the data set has {declared} classes ({where}) but "
                              f"model.num_classes={model.num_classes}; set model.num_classes={declared}")


def _model_description(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The resolved architecture (registry entry + overrides), minus the registry's prose."""
    from lipnext_scale.model import get_spec

    spec = dataclasses.asdict(get_spec(name, **kwargs))
    return {"name": name, **{k: v for k, v in spec.items() if k not in ("description", "source")}}


def check_same_model(model: ModelConfig, start: StartPoint, key: str) -> None:
    """The start checkpoint was trained with this run's model (architecture and parameter shapes)."""
    from lipnext_scale.model import create_model

    ours_kwargs = {"num_classes": model.num_classes, "image_size": model.image_size, **model.overrides()}
    how = ("resume with the model settings it was trained with, or train a new model from scratch "
           "(a new train.name, or train.resume=none)")
    stored = start.meta.get("config") or {}
    if isinstance(stored, dict) and "model" in stored:
        try:
            theirs = _model_description(*model_kwargs(stored))
        except (ExportError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{key}: checkpoint {start.url} stores a model config this version cannot read "
                              f"({e}); {how}") from None
        ours = _model_description(model.name, ours_kwargs)
        differ = sorted(k for k in ours if ours[k] != theirs.get(k))
        if differ:
            shown = ", ".join(f"{k}: checkpoint {theirs.get(k)!r}, this run {ours[k]!r}" for k in differ)
            raise ConfigError(f"{key}: checkpoint {start.url} was trained with another model ({shown}); {how}")
    built = create_model(model.name, device="meta", **ours_kwargs)
    ours_shapes = {n: list(p.shape) for n, p in built.named_parameters()}
    if ours_shapes != start.meta.get("param_shapes"):
        theirs_shapes = start.meta.get("param_shapes") or {}
        differ = sorted(set(ours_shapes) ^ set(theirs_shapes) |
                        {n for n in ours_shapes if n in theirs_shapes and ours_shapes[n] != theirs_shapes[n]})
        raise ConfigError(f"{key}: checkpoint {start.url} holds parameters that do not fit this run's model "
                          f"(first differences: {differ[:3]}); {how}")


def check_resume(cfg: JobConfig, run_url: str) -> StartPoint | None:
    """The checkpoint the job starts from: an explicit train.resume, else this run's newest valid one."""
    resume = cfg.train.resume
    manager = CheckpointManager(run_url, keep_last=cfg.ckpt.keep_last)
    if resume == "none" and manager.checkpoints():
        raise ConfigError(f"train.resume=none but {run_url} already has checkpoints; pick a new train.name, "
                          "delete the run directory, or use train.resume=auto to continue it")
    try:
        start = manager.start_point(resume)
    except CheckpointError as e:
        raise ConfigError(f"train.resume={resume!r}: {e}") from None
    if start is not None:
        key = "train.resume" if resume != "auto" else "train.resume=auto (this run's newest checkpoint)"
        check_same_model(cfg.model, start, key)
    return start


def check_engine_configs(cfg: JobConfig, ds_base: dict[str, Any]) -> None:
    """The engine config every world size of train.num_workers' range would train with (its `BatchPlan` and
    the DeepSpeed file's settings, hpZ included) builds, so an elastic run cannot fail at a resize. The
    cluster's shape is only known to the workers (they size hpZ from it and log the choice); here each size
    is checked on one node and, where it splits evenly, on nodes of the range's smallest size."""
    low, high = cfg.train.worker_range
    for world in range(low, high + 1):
        plan = cfg.batch_plan(world)
        shapes = [[0] * world]
        if world > low and world % low == 0:
            shapes.append([r // low for r in range(world)])
        for node_of_rank in shapes:  # raises ConfigError on a non-ZeRO-3 file or a bad hpZ setting
            deepspeed_config(ds_base, cfg.train, plan, cfg.optim, world, node_of_rank)


def check_job(cfg: JobConfig) -> JobStart:
    """Every start-time check; nothing is written but the storage probe (created and deleted)."""
    from lipnext_scale.model import get_spec

    cfg.validate()
    try:
        get_spec(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
                 **cfg.model.overrides())
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"[model]: {e.args[0] if e.args else e}") from None
    ds_base = read_deepspeed_config(cfg.train.deepspeed)
    check_engine_configs(cfg, ds_base)
    check_data(cfg.data, cfg.model)
    run_url = run_url_of(cfg)
    check_storage(run_url)
    start = check_resume(cfg, run_url)
    return JobStart(run_url, ds_base, start)


def write_run_config(cfg: JobConfig, run_url: str) -> None:
    write_json(RunLayout(run_url).config, config_to_dict(cfg), ConfigError)
