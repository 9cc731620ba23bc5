"""Ray job entry point: train from a TOML job config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python launchers/train.py --config configs/train/cifar10_l32w1024.toml --set train.storage=s3://bucket/runs

Same flags and code path as `lipnext train` (lipnext_scale/train/cli.py); see docs/multinode.md.
"""

from __future__ import annotations

import argparse
import sys

from lipnext_scale.cli import run_command
from lipnext_scale.train.cli import add_arguments, run_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launchers/train.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command(parser.prog, run_train, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
