"""Ray job entry point: train lipnext-2b on ImageNet shards with configs/train/imagenet_2b.toml.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python launchers/train_2b.py --data s3://bucket/imagenet-shards --storage s3://bucket/runs

--data is the directory the ImageNet data prep wrote (train and val shards with their manifests).
Without --num-workers it runs one worker per GPU the Ray cluster offers; `--num-workers 8-16` is elastic
(Ray Train runs 8 to 16 workers, as many as the cluster holds, and resizes when nodes leave or return).
See docs/multinode.md.
"""

from __future__ import annotations

import argparse
import sys

from lipnext_scale.cli import run_command
from lipnext_scale.train.cli import (add_set_argument, build_train_config, cluster_workers_per_node, dataset_overrides,
                                    deepspeed_for_cluster, default_num_workers, run_train_config, toml_string)

CONFIG = "configs/train/imagenet_2b.toml"


def train_2b(args: argparse.Namespace) -> int:
    num_workers = args.num_workers or default_num_workers(args.ray_address)  # no GPUs: LipnextError
    overrides = [*dataset_overrides(args.data), f"train.storage={toml_string(args.storage)}",
                 f"train.num_workers={toml_string(num_workers) if '-' in str(num_workers) else num_workers}"]
    cfg = build_train_config(CONFIG, overrides + args.overrides)  # a bad --set fails before Ray is asked
    # The ZeRO config follows the cluster's shape: the multi-node one when the nodes that can host a worker
    # (GPU workers: nodes with GPUs; CPU workers: nodes with train.cpus_per_worker CPUs) are several.
    # Recorded in the run's config.json; --set train.deepspeed=... wins.
    zero = deepspeed_for_cluster(cluster_workers_per_node(args.ray_address, cfg.train))
    overrides += [f"train.deepspeed={toml_string(zero)}", *args.overrides]
    return run_train_config(CONFIG, overrides, resume=args.resume, ray_address=args.ray_address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launchers/train_2b.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared ImageNet shard directory (path or URL)")
    parser.add_argument("--storage", required=True, help="where runs live: shared path, s3://, gs://")
    parser.add_argument("--num-workers", default=None, metavar="N|MIN-MAX",
                        help="Ray Train workers, or an elastic range such as 8-16 (default: all GPUs)")
    parser.add_argument("--resume", default=None, metavar="PATH", help="resume from this checkpoint")
    parser.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS (set by `ray job submit`)")
    add_set_argument(parser)
    return run_command(parser.prog, train_2b, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
