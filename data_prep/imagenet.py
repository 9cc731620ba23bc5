"""Preprocess ImageNet (folders, original archives or CLS-LOC) into shards; run locally or as a Ray job:

    python data_prep/imagenet.py --source /data/imagenet --out s3://bucket/imagenet-256
    ray job submit --working-dir . -- python data_prep/imagenet.py --source ... --out ...
"""

import sys

from lipnext_scale.cli import prep_main

if __name__ == "__main__":
    sys.exit(prep_main("imagenet"))
