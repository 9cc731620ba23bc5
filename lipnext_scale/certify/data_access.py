"""The certification job's view of the evaluation data: what is certification-specific, on top of data's.

Resolving shards, reading them and the error rules come from the data pipeline (`lipnext_scale.data`:
`resolve_shards`, `iter_shard_samples`, tar_reader.py's rules); here: certification reads at the stored
size and never skips (`SkipStats(strict=True)`): an undecodable sample, a truncated shard or one that does
not match its manifest's sha256 is an error naming the shard (and key) and the fix, because a silently
dropped or corrupt sample would make the reported accuracy a lie. Also here: the preflight against the
model (class count, image size, the evaluation view: ImageNet's centre crop of images stored at the evaluation
resize), the data fingerprint for the report, and file-name-safe shard names.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Iterator

import torch

from lipnext_scale.certify.model_loading import CertifyError


def resolve_shards(data_url: str) -> list[str]:
    """Shard URLs of `data_url`: a manifest, a brace pattern, a glob, one .tar or a split prefix."""
    from lipnext_scale.data.errors import DataError
    from lipnext_scale.data.shards import resolve_shards as data_resolve_shards

    try:
        return list(data_resolve_shards(data_url))
    except DataError as e:
        raise CertifyError(f"--data: {e}") from None


def shard_name(shard_url: str) -> str:
    """A file-name-safe id of a shard, unique within one data set (its base name without .tar)."""
    base = posixpath.basename(shard_url.rstrip("/"))
    return base[:-4] if base.endswith(".tar") else base


def iter_shard_samples(shard_url: str) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(key, CHW float32 image in [0, 1], label) in shard order, at the stored size; any bad sample or
    unreadable part of the shard, or a mismatch with its manifest's sha256, raises CertifyError. Labels are
    checked against the model by `check_sample` (the data pipeline's one label rule, with this job's fix)."""
    from lipnext_scale.data.errors import DataError
    from lipnext_scale.data.shards import iter_shard_samples as data_iter_shard_samples
    from lipnext_scale.data.tar_reader import SkipStats

    try:
        yield from data_iter_shard_samples(shard_url, stats=SkipStats(strict=True))
    except DataError as e:
        raise CertifyError(str(e)) from None


def evaluation_view(image: torch.Tensor, image_size: int, dataset: str | None) -> torch.Tensor | None:
    """The model's input for a stored evaluation image, exactly as training's evaluation takes it
    (`data.transforms.eval_transform`): the image itself at the model's size; for a resized-crop data set
    (ImageNet) stored at the evaluation resize (short side round(image_size / 0.875): 256 for 224, what
    `lipnext prep` stores by default), its centre image_size crop, the same box as `center_crop`. None when no
    exact view exists (another size would need a resize the job does not do: the caller refuses). A crop is a
    coordinate projection, so a certificate of the crop also holds for the stored image."""
    from lipnext_scale.data.transforms import IMAGENET_EVAL_CROP, RESIZED_CROP_DATASETS

    h, w = image.shape[-2:]
    if (h, w) == (image_size, image_size):
        return image
    if dataset in RESIZED_CROP_DATASETS and min(h, w) == int(round(image_size / IMAGENET_EVAL_CROP)):
        top, left = (h - image_size) // 2, (w - image_size) // 2
        return image[..., top:top + image_size, left:left + image_size].contiguous()
    return None


def check_sample(shard_url: str, key: str, image: torch.Tensor, label: int, image_size: int,
                 num_classes: int, dataset: str | None = None) -> torch.Tensor:
    """The sample's model input (`evaluation_view`), or CertifyError naming the shard, the sample and the fix."""
    where = f"shard {shard_url!r}, sample {key!r}"
    view = evaluation_view(image, image_size, dataset)
    if view is None:
        from lipnext_scale.data.transforms import IMAGENET_EVAL_CROP

        stored = int(round(image_size / IMAGENET_EVAL_CROP))
        raise CertifyError(f"{where}: image is {image.shape[-2]}x{image.shape[-1]} but the model takes "
                           f"{image_size}x{image_size}; prepare the data with image_size={image_size} (ImageNet: "
                           f"or {stored}, centre-cropped as in training's evaluation) or certify a model trained "
                           "at this size")
    from lipnext_scale.data.tar_reader import label_problem

    if (problem := label_problem(label, num_classes)) is not None:  # the data pipeline's one label check
        raise CertifyError(f"{where}: {problem}; this data set does not match the checkpoint")
    return view


def checkpoint_dataset(config: dict) -> str | None:
    """The data set a checkpoint's job config trained on (`data.dataset`), which fixes its evaluation view."""
    data = config.get("data") if isinstance(config, dict) else None
    return data.get("dataset") if isinstance(data, dict) else None


def _data_dir(shards: list[str]) -> str:
    from lipnext_scale.storage import parent_url

    return parent_url(shards[0])


def dataset_num_classes(shards: list[str]) -> int | None:
    """The data set's declared class count (its manifest, else classes.json), if it has one."""
    from lipnext_scale.data.errors import DataError
    from lipnext_scale.data.manifest import dataset_classes

    try:
        return dataset_classes(shards)[0]
    except DataError as e:
        raise CertifyError(str(e)) from None


def preflight(shards: list[str], image_size: int, num_classes: int, dataset: str | None = None) -> None:
    """Fail before any work when the data cannot match the model: class count, first image's size (and its
    evaluation view for `dataset`)."""
    data_classes = dataset_num_classes(shards)
    if data_classes is not None and data_classes != num_classes:
        raise CertifyError(f"the data set has {data_classes} classes (classes.json next to {shards[0]!r}) "
                           f"but the model has {num_classes}; certify with data of the model's classes")
    first = next(iter_shard_samples(shards[0]), None)
    if first is None:
        raise CertifyError(f"shard {shards[0]!r} is empty; re-create the data set")
    check_sample(shards[0], *first, image_size, num_classes, dataset)


def data_fingerprint(shards: list[str]) -> str:
    """sha256 over the shard list (names and sizes) and the split's manifest when there is one
    (`{split}-manifest.parquet`, which holds every shard's sha256): identifies the evaluation data in
    the report without reading every shard."""
    from lipnext_scale.data.manifest import manifest_url
    from lipnext_scale.storage import file_size, is_file, read_bytes

    h = hashlib.sha256()
    for url in shards:
        h.update(f"{shard_name(url)}|{file_size(url, CertifyError)}\n".encode())
    for split in sorted({shard_name(s).rsplit("-", 1)[0] for s in shards}):
        manifest = manifest_url(_data_dir(shards), split)
        if is_file(manifest, CertifyError):
            h.update(read_bytes(manifest, CertifyError))
    return h.hexdigest()
