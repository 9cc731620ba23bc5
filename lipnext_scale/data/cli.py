"""`lipnext prep KIND --out URL ...` and the `data_prep/*.py` scripts (`lipnext_scale.cli.prep_main`): parse,
call `prepare`, print a summary.

No torch/ray import at module level: `lipnext --help` imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import json

from lipnext_scale.data.sources import KINDS  # light: PIL, no torch/ray
from lipnext_scale.errors import LipnextError


def add_arguments(p: argparse.ArgumentParser, kind: str | None = None) -> None:
    if kind is None:
        p.add_argument("kind", choices=KINDS, help="which data set (its source layout is detected)")
    p.add_argument("--source", default=None,
                   help="source URL/path: ImageNet folders, archives or CLS-LOC; the CIFAR release archive "
                        "(python or binary) or its extracted folder; tiny-imagenet-200; none for digits")
    p.add_argument("--out", required=True, help="output fsspec URL (path, file://, s3://, gs://, memory://)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=int, default=None,
                   help="short side of stored images (default: 256 ImageNet, 64 Tiny-ImageNet, 32 CIFAR/digits)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--workers", type=int, default=None, help="concurrent shard tasks (default: cluster CPUs)")
    p.add_argument("--splits", default=None, help="comma-separated subset of splits, e.g. val")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_prep(args: argparse.Namespace) -> int:
    from lipnext_scale.data.prep import ShardFormat, prepare

    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    try:
        fmt = ShardFormat(shard_size=args.shard_size, image_size=args.image_size, quality=args.quality)
        summary = prepare(args.kind, args.source, args.out, fmt, workers=args.workers, splits=splits,
                          progress=not args.no_progress)
    except LipnextError:  # DataError, StorageError: the message names the input and the fix
        raise
    except (ValueError, OSError) as e:  # a source or output the library could not name
        raise LipnextError(str(e)) from None
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['kind']} -> {summary['out']}: {summary['images_written']} images written in "
          f"{summary['seconds']:.1f} s ({summary['images_per_s']} images/s, {summary['workers']} workers)")
    for split, s in summary["splits"].items():
        print(f"  {split}: {s['samples']} samples in {s['shards']} shards "
              f"({s['shards_written']} written, {s['shards_skipped']} already complete), {s['bytes'] / 2**20:.1f} MiB")
    if summary["files_skipped"]:
        print(f"  skipped {summary['files_skipped']} unreadable source files: {summary['files_skipped_by_reason']}")
        for origin, reason in summary["files_skipped_examples"]:
            print(f"    {origin}: {reason}")
    return 0
