"""Preprocess Tiny-ImageNet (`tiny-imagenet-200/`) into shards: `python data_prep/tiny_imagenet.py --source DIR --out URL`."""

import sys

from lipnext_scale.cli import prep_main

if __name__ == "__main__":
    sys.exit(prep_main("tiny-imagenet"))
