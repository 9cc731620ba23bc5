"""`lipnext train`: parse flags, build the one JobConfig, call the library.

The launchers under `launchers/` reuse `build_train_config` and `run_train_config`, so a job submitted
with `ray job submit ... python launchers/train.py` and a local `lipnext train` run the same code.
Heavy imports (torch, ray, deepspeed) happen inside the functions: `lipnext --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lipnext_scale.errors import LipnextError
from lipnext_scale.runtime import connect_ray

REPO_ROOT = Path(__file__).resolve().parents[2]


def add_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set optim.lr=0.1 (repeatable)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `lipnext train` (and of launchers/train.py)."""
    p.add_argument("--config", required=True, help="a TOML job config, e.g. configs/train/demo.toml")
    add_set_argument(p)
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="resume from this checkpoint (path or URL) instead of the run's newest valid one (the "
                        "run's later checkpoints, if any, are moved to {run}/superseded-*/)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to run on (default: RAY_ADDRESS, else a new local instance)")


def resolve_config_path(path: str) -> Path:
    """A config path as given, else relative to the repository (so `configs/...` works from anywhere)."""
    from lipnext_scale.storage import is_file

    given = Path(path)
    if given.is_absolute() or is_file(str(given)):
        return given
    in_repo = REPO_ROOT / given
    return in_repo if is_file(str(in_repo)) else given


def toml_string(text: str) -> str:
    """`text` as a TOML basic string, so a --set value such as a path is never re-parsed as a number."""
    return json.dumps(text)  # JSON string escapes are a subset of TOML basic-string escapes


def build_train_config(config_path: str, overrides: list[str], *, resume: str | None = None):
    """The validated JobConfig: file, then `--set` overrides, then --resume (raises ConfigError)."""
    from lipnext_scale.config import load_config

    overrides = list(overrides)
    if resume is not None:
        overrides.append(f"train.resume={toml_string(resume)}")
    return load_config(resolve_config_path(config_path), overrides)


def dataset_overrides(data_url: str) -> list[str]:
    """`--set` overrides pointing the job at a prepared data set directory (its train/val manifests)."""
    from lipnext_scale.data.manifest import manifest_url

    return [f"data.train_url={toml_string(manifest_url(data_url, 'train'))}",
            f"data.eval_url={toml_string(manifest_url(data_url, 'val'))}"]


def default_num_workers(ray_address: str | None) -> int:
    """One worker per GPU of the Ray cluster; raises LipnextError when it has none."""
    import ray

    connect_ray(ray_address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise LipnextError("the Ray cluster offers no GPUs; pass --num-workers N (and --set train.use_gpu=false "
                           "to train on CPU workers)")
    return gpus


DEEPSPEED_ONE_NODE = "configs/deepspeed/zero3_bf16.json"
DEEPSPEED_MANY_NODES = "configs/deepspeed/zero3_bf16_multinode.json"


def deepspeed_for_cluster(workers_per_node: list[int]) -> str:
    """The ZeRO config for the cluster's shape (`workers_per_node`: how many training workers each node can
    host): plain ZeRO-3 when one node can host workers; ZeRO++ hierarchical partitioning when the workers can
    span several (the engine sizes its partition from the ranks per node at every (re)start)."""
    return DEEPSPEED_MANY_NODES if sum(1 for w in workers_per_node if w > 0) > 1 else DEEPSPEED_ONE_NODE


def worker_slots(node_resources: list[dict[str, float]], worker: dict[str, float]) -> list[int]:
    """How many workers needing `worker` (e.g. {"CPU": 1, "GPU": 1}) each node's resources hold."""
    return [min(int(res.get(k, 0) // v) for k, v in worker.items() if v > 0) if worker else 0
            for res in node_resources]


def cluster_workers_per_node(ray_address: str | None, train) -> list[int]:
    """Training workers each live node of the Ray cluster can host, for the worker `train` (TrainConfig)
    describes: train.cpus_per_worker CPUs, and one GPU when it trains on GPUs (train.use_gpu; "auto": the
    cluster has GPUs). A CPU-only head counts for GPU workers as 0; for CPU workers its CPUs count."""
    import ray

    from lipnext_scale.train.trainer import trains_on_gpu, worker_resources

    connect_ray(ray_address)
    need = worker_resources(train, trains_on_gpu(train.use_gpu, ray))
    return worker_slots([n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")], need)


def print_summary(result: dict[str, Any], out=sys.stdout) -> None:
    """run_training's result: checkpoint, run directory, then the final metrics, one per line."""
    print(f"  run_dir: {result.get('run_dir')}\n  checkpoint: {result.get('checkpoint')}", file=out)
    for key, value in sorted((result.get("metrics") or {}).items()):
        if isinstance(value, float):
            value = f"{value:.4g}"
        if isinstance(value, (str, int, float, bool)):
            print(f"  {key}: {value}", file=out)


def run_train_config(config_path: str, overrides: list[str], *, resume: str | None = None,
                     ray_address: str | None = None) -> int:
    """Build the config and train. A bad config or input raises a LipnextError naming it (ConfigError, or at
    job start for unreachable data/storage URLs and bad checkpoints); a diverged run TrainingDiverged."""
    cfg = build_train_config(config_path, overrides, resume=resume)
    from lipnext_scale.train.trainer import run_training

    try:
        result = run_training(cfg, ray_address=ray_address)
    except FileNotFoundError as e:  # the message names the thing and the fix; a traceback would only hide it
        raise LipnextError(str(e)) from None
    print(f"training finished: {cfg.train.name}")
    print_summary(result)
    return 0


def run_train(args: argparse.Namespace) -> int:
    return run_train_config(args.config, args.overrides, resume=args.resume, ray_address=args.ray_address)
