"""Preprocess Tiny-ImageNet (`tiny-imagenet-200/`) into shards: `python data_prep/tiny_imagenet.py --source DIR --out URL`."""

import sys

from lipnext_scale.data.cli import main_for

if __name__ == "__main__":
    sys.exit(main_for("tiny-imagenet"))
