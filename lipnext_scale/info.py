"""`lipnext info`: the model registry as a table or JSON (sizes come from the specs, nothing is built)."""

from __future__ import annotations

import argparse
import json

from lipnext_scale.errors import LipnextError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="one model name (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run_info(args: argparse.Namespace) -> int:
    from lipnext_scale.model import list_models, model_info

    names = [args.name] if args.name else list_models()
    try:
        rows = [model_info(n) for n in names]
    except KeyError as e:  # an unknown name: the message lists the registered models
        raise LipnextError(e.args[0]) from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<20}{'params':>15}{'width':>7}{'depth':>7}{'patch':>6}{'input':>7}{'GFLOPs/img':>12}  source"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<20}{r['params']:>15,}{r['width']:>7}{r['depth']:>7}{r['patch_size']:>6}"
              f"{r['image_size']:>7}{r['flops_per_image'] / 1e9:>12.2f}  {r['source']}")
    return 0
