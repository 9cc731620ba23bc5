"""Preprocess CIFAR-10/100 from the python or binary release archive (nothing but plain arrays is
unpickled) into shards:

    python data_prep/cifar.py cifar10 --source cifar-10-python.tar.gz --out URL
    python data_prep/cifar.py cifar100 --source cifar-100-binary.tar.gz --out URL
"""

import sys

from lipnext_scale.cli import prep_main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("cifar10", "cifar100"):
        sys.exit("usage: python data_prep/cifar.py {cifar10,cifar100} --source ARCHIVE --out URL [...]")
    sys.exit(prep_main(sys.argv[1], sys.argv[2:]))
