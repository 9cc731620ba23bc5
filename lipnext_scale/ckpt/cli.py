"""`lipnext export CKPT OUT`: consolidate a training checkpoint into the exported format.

Nothing heavy is imported until the command runs (`lipnext --help` imports this module for its flags).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a training checkpoint directory (path or URL), any world size, or a run "
                                      "directory (its newest checkpoint)")
    p.add_argument("out", help="output directory (path or URL) for model.safetensors + config.json")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an existing export")


def run_export(args: argparse.Namespace) -> int:
    """Consolidate a (ZeRO-3, any world size) checkpoint and write it in the exported format. A bad input
    raises CheckpointError, ExportError or StorageError (one line naming the input and the fix)."""
    from lipnext_scale.ckpt.export import export_checkpoint

    url, state_dict, config = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    params = sum(t.numel() for t in state_dict.values())
    print(f"exported {url} -> {args.out} ({len(state_dict)} tensors, {params:,} values, "
          f"model {config['model']['name']})")
    return 0
