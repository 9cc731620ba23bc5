"""scikit-learn's digits: 1797 real 8x8 grayscale scans of handwritten digits, shipped inside the wheel.

Split deterministically (a fixed-seed permutation) into 1497 train / 300 val. Stored as PNG: the
images are tiny and upscaled, and JPEG ringing around their sharp strokes would be a visible,
pointless loss; PNG is lossless and decodes just as fast at this size.
"""

from __future__ import annotations

import numpy as np

from lipnext_scale.data.sources.base import PixelsRef, SourcePlan, SourceSample

NUM_VAL = 300


def list_digits(source: str | None = None) -> SourcePlan:
    if source:
        raise ValueError("digits needs no --source: it ships inside scikit-learn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(pixels))
    split_indices = {"train": np.sort(order[NUM_VAL:]), "val": np.sort(order[:NUM_VAL])}
    splits = {
        split: [SourceSample(key=f"digits_{i:04d}", label=int(bunch.target[i]), origin=f"load_digits[{i}]",
                             ref=PixelsRef(8, 8, 1, pixels[i].tobytes()))
                for i in idx]
        for split, idx in split_indices.items()
    }
    return SourcePlan(kind="digits", classes=[str(c) for c in range(10)], splits=splits, image_format="png",
                      names=[str(c) for c in range(10)], default_image_size=32)
