"""Preprocess scikit-learn's digits (no download) into shards: `python data_prep/digits.py --out URL`."""

import sys

from lipnext_scale.cli import prep_main

if __name__ == "__main__":
    sys.exit(prep_main("digits"))
