"""The `lipnext` console script: one subcommand per job, each implemented in its own module.

Each subcommand is wired below from its module's `add_arguments(parser)` (its flags) and its run function
(`run(args) -> int`). Those modules are imported to build the parser, so they keep torch/ray/deepspeed
imports inside their functions: `lipnext --help` and `lipnext info` stay fast.

`run_command` is the one place where a user-facing error (`LipnextError`) becomes one line on stderr,
`lipnext <command>: error: <message>`, and the exit code (2 for bad input); the launchers and the data
prep scripts run their command through it too.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple

from lipnext_scale import demo, info, plan
from lipnext_scale.certify import cli as certify_cli
from lipnext_scale.ckpt import cli as ckpt_cli
from lipnext_scale.data import cli as data_cli
from lipnext_scale.errors import LipnextError
from lipnext_scale.runtime import quiet_console
from lipnext_scale.serve import cli as serve_cli
from lipnext_scale.train import cli as train_cli


class Command(NamedTuple):
    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    help: str


COMMANDS = (
    Command("info", info.add_arguments, info.run_info, "list registered models: params, width, depth, FLOPs"),
    Command("train", train_cli.add_arguments, train_cli.run_train,
            "train a model from a TOML job config (Ray Train + DeepSpeed)"),
    Command("export", ckpt_cli.add_arguments, ckpt_cli.run_export,
            "consolidate a checkpoint (or a run directory's newest) into safetensors + config.json"),
    Command("certify", certify_cli.add_arguments, certify_cli.run_certify,
            "certify a checkpoint on evaluation shards with Ray workers: CRA report, optional PGD check"),
    Command("serve", serve_cli.add_arguments, serve_cli.run_serve,
            "serve certified predictions over HTTP (Ray Serve): each image's class, certified radius and weights "
            "hash"),
    Command("demo", demo.add_arguments, demo.run_demo,
            "prepare digits, train lipnext-tiny on 2 CPU workers, certify it"),
    Command("plan", plan.add_arguments, plan.run_plan,
            "per-GPU memory of a model under ZeRO-3 (manifold state by owner), the smallest GPU count that fits"),
    Command("prep", data_cli.add_arguments, data_cli.run_prep,
            "preprocess imagenet / cifar10 / cifar100 / tiny-imagenet / digits into WebDataset shards (Ray tasks)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipnext", description="Train and certify LipNeXt networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def run_command(prog: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run one command as an entry point: the console kept to our lines (`runtime.quiet_console`), and a
    LipnextError printed as `{prog}: error: {message}` (no traceback) with its exit code."""
    quiet_console()
    try:
        return int(run(args) or 0)
    except LipnextError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"lipnext {args.command}", args._run, args)


def prep_main(kind: str, argv: list[str] | None = None) -> int:
    """Entry point of `data_prep/<kind>.py`: `lipnext prep KIND`'s flags, less the kind."""
    p = argparse.ArgumentParser(prog=f"data_prep/{kind.replace('-', '_')}.py",
                                description=f"Preprocess {kind} into WebDataset shards (a Ray job).")
    data_cli.add_arguments(p, kind=kind)
    args = p.parse_args(argv)
    args.kind = kind
    return run_command(p.prog, data_cli.run_prep, args)


if __name__ == "__main__":
    sys.exit(main())
