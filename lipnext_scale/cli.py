"""The `lipnext` console script: one subcommand per job, each implemented in its own module.

Subcommands are registered in `_COMMANDS` as (name, "module:function", help); the module's
`add_arguments(parser)` adds its flags and `function(args) -> int` runs it. Modules are imported only
when their subcommand runs, so `lipnext info` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

_COMMANDS: list[tuple[str, str, str]] = [
    ("info", "lipnext_scale.cli:run_info", "list registered models: params, width, depth, FLOPs"),
]


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="one model name (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run_info(args: argparse.Namespace) -> int:
    from lipnext_scale.model import list_models, model_info

    names = [args.name] if args.name else list_models()
    try:
        rows = [model_info(n) for n in names]
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<22}{'params':>16}{'width':>7}{'depth':>7}{'k':>3}{'patch':>6}{'input':>7}{'GFLOPs/img':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<22}{r['params']:>16,}{r['width']:>7}{r['depth']:>7}{r['expansion']:>3}"
              f"{r['patch_size']:>6}{r['image_size']:>7}{r['flops_per_image'] / 1e9:>12.2f}")
    return 0


def _resolve(target: str):
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, func_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipnext", description="Train and certify LipNeXt networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, target, help_text in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_target=target)
        module_name, func_name = target.split(":")
        if module_name == __name__:
            globals()[f"add_{name}_arguments"](p)
        else:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, func = _resolve(args._target)
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
