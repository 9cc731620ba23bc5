"""Preprocess scikit-learn's digits (no download) into shards: `python data_prep/digits.py --out URL`."""

import sys

from lipnext_scale.data.cli import main_for

if __name__ == "__main__":
    sys.exit(main_for("digits"))
