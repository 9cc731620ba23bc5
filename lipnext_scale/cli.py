"""The `lipnext` console script: one subcommand per job, each implemented in its own module.

Subcommands are registered in `_COMMANDS` as (name, "module:function", help); the module's
`add_arguments(parser)` adds its flags and `function(args) -> int` runs it. Every listed module is
imported to build the parser, so those modules keep torch/ray/deepspeed imports inside their functions:
`lipnext --help` and `lipnext info` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMANDS: list[tuple[str, str, str]] = [
    ("info", "lipnext_scale.info:run_info", "list registered models: params, width, depth, FLOPs"),
    ("train", "lipnext_scale.train.cli:run_train", "train a model from a TOML job config (Ray Train + DeepSpeed)"),
    ("export", "lipnext_scale.train.cli:run_export",
     "consolidate a checkpoint (or a run directory's newest) into safetensors + config.json"),
    ("certify", "lipnext_scale.certify.cli:run_certify",
     "certify a checkpoint on evaluation shards with Ray workers: CRA report, optional PGD check"),
    ("serve", "lipnext_scale.serve.cli:run_serve",
     "serve certified predictions over HTTP (Ray Serve): each image's class, certified radius and weights hash"),
    ("demo", "lipnext_scale.demo:run_demo", "prepare digits, train lipnext-tiny on 2 CPU workers, certify it"),
    ("plan", "lipnext_scale.plan:run_plan",
     "per-GPU memory of a model under ZeRO-3 (manifold state by owner), the smallest GPU count that fits"),
    ("prep", "lipnext_scale.data.cli:run_prep",
     "preprocess imagenet / cifar10 / cifar100 / tiny-imagenet / digits into WebDataset shards (Ray tasks)"),
]


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
        module = importlib.import_module(target.split(":")[0])
        # A module serving several subcommands names their flag adders add_{name}_arguments.
        (getattr(module, f"add_{name}_arguments", None) or module.add_arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, func = _resolve(args._target)
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
