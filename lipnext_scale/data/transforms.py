"""Decode and augment with PIL (torchvision cannot be installed beside our torch build).

Outputs stay in raw pixel space [0, 1]: no std division, because a std < 1 would scale the network's
Lipschitz constant and the certificate (paper.md B.1); the model subtracts a mean itself.
Randomness comes from an explicit `random.Random`, so the training loader can make every sample's
augmentation a pure function of its position in the stream (exact resume).
"""

from __future__ import annotations

import io
import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from lipnext_scale.config import Dataset, choices
from lipnext_scale.errors import LipnextError

DATASETS = choices(Dataset)  # the one list, shared with config validation
# Augmentation family per data set: ImageNet crops at random scale, the small-image sets
# (CIFAR, digits, Tiny-ImageNet) crop with zero padding.
RESIZED_CROP_DATASETS = ("imagenet",)
PADDED_CROP_DATASETS = tuple(d for d in DATASETS if d not in RESIZED_CROP_DATASETS)
IMAGENET_EVAL_CROP = 0.875  # resize to size/0.875 then center crop (224 from 256), the timm convention
# Stored images are prepared at a short side of a few hundred pixels; a header announcing more than this
# (a 9500x9500 PNG of a few hundred KB would cost GBs once decoded) is refused before any pixel is
# decoded. PIL's own MAX_IMAGE_PIXELS (89M, an error only at twice that) is far too high for a loader.
MAX_DECODED_PIXELS = 4096 * 4096


class SampleError(LipnextError, ValueError):
    """One sample cannot be used (corrupt image, missing member, bad label); the reason says which."""


def check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r}: choose one of {', '.join(DATASETS)} (it picks the augmentation)")


def decode_image(data: bytes) -> Image.Image:
    """JPEG/PNG bytes -> RGB PIL image; corrupt data or more than MAX_DECODED_PIXELS raises SampleError
    (the size is read from the header, before decoding)."""
    try:
        img = Image.open(io.BytesIO(data))  # parses the header only
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise SampleError(f"undecodable image ({type(e).__name__}: {e})") from e
    width, height = img.size
    if width * height > MAX_DECODED_PIXELS:
        raise SampleError(f"image too large to decode ({width}x{height} pixels, over MAX_DECODED_PIXELS = "
                          f"{MAX_DECODED_PIXELS})")
    try:
        img.load()
    except Exception as e:
        raise SampleError(f"undecodable image ({type(e).__name__}: {e})") from e
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_short_side(img: Image.Image, size: int, resample=Image.Resampling.BILINEAR) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The torchvision RandomResizedCrop box (left, top, right, bottom): area fraction in `scale`,
    log-uniform aspect ratio in `ratio`, 10 tries, then a center crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def padded_random_crop(img: Image.Image, size: int, pad: int, rng: random.Random) -> Image.Image:
    """Zero-pad by `pad` on every side, then crop `size` at a random offset (PIL fills outside with 0)."""
    if img.size != (size, size):
        img = center_crop(resize_short_side(img, size), size)
    dx, dy = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    return img.crop((dx - pad, dy - pad, dx - pad + size, dy - pad + size))


def train_augment(img: Image.Image, dataset: str, image_size: int, rng: random.Random) -> Image.Image:
    img, mirror = train_crop(img, dataset, image_size, rng)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else img


def train_crop(img: Image.Image, dataset: str, image_size: int, rng: random.Random) -> tuple[Image.Image, bool]:
    """`train_augment` up to its horizontal flip: (the crop, whether to mirror it), the same draws from `rng`.
    The loader mirrors while it copies the pixels into the batch (a reversed view), not as a PIL pass."""
    if dataset in RESIZED_CROP_DATASETS:
        box = random_resized_crop_box(img.width, img.height, rng)
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    else:
        img = padded_random_crop(img, image_size, max(1, image_size // 8), rng)
    return img, rng.random() < 0.5


def eval_transform(img: Image.Image, dataset: str, image_size: int) -> Image.Image:
    if dataset in RESIZED_CROP_DATASETS:
        img = resize_short_side(img, int(round(image_size / IMAGENET_EVAL_CROP)))
        return center_crop(img, image_size)
    if img.size != (image_size, image_size):
        img = center_crop(resize_short_side(img, image_size), image_size)
    return img


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_float_chw(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    return to_uint8_chw(img).float().div_(255.0)


def to_uint8_hwc(img: Image.Image, mirror: bool = False) -> np.ndarray:
    """(H, W, 3) uint8, read-only: one copy out of PIL and no tensor yet (`hwc_to_chw_batch` writes the batch);
    `mirror`: a left-right reversed view, the pixels of `img.transpose(FLIP_LEFT_RIGHT)`."""
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[:, ::-1] if mirror else pixels


def hwc_to_chw_batch(images: Sequence[np.ndarray], out: torch.Tensor) -> torch.Tensor:
    """Equal-sized uint8 (H, W, 3) images -> `out` (B, 3, H, W): uint8 as they are, float32 in [0, 1] (the
    values of `.float().div_(255)`, bit for bit). Each image is converted straight into its slot of `out` (a
    loader worker's shared memory) while it is in cache: no per-image tensor, no float copy of the batch."""
    slots = out.numpy()  # a view: numpy writes where `out` lives
    for image, slot in zip(images, slots):
        slot[...] = image.transpose(2, 0, 1)
        if out.is_floating_point():
            np.divide(slot, np.float32(255.0), out=slot)  # float32 / float32, as torch's div_ computes it
    return out
