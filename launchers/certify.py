"""Ray job entry point: `ray job submit -- python launchers/certify.py CKPT --data URL [--out URL] ...`.

Same flags as `lipnext certify`; inside a Ray job `ray.init()` joins the job's cluster.
"""

import argparse
import sys

from lipnext_scale.certify.cli import add_arguments, run_certify
from lipnext_scale.cli import run_command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="launchers/certify.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run_command(parser.prog, run_certify, parser.parse_args()))
