"""Batch assembly of the loaders: the values of the float batch and where a worker builds it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from lipnext_scale.data.streams import FloatBatches, collate_eval, collate_train, collate_train_uint8
from lipnext_scale.data.transforms import hwc_to_chw_batch, to_uint8_hwc, train_augment, train_crop


def _images(n: int = 3) -> list[np.ndarray]:
    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rng = np.random.default_rng(0)
    return [np.stack([np.roll(every_value, i), every_value.T, rng.integers(0, 256, (16, 16), dtype=np.uint8)], axis=-1)
            for i in range(n)]


def _reference(images: list[np.ndarray]) -> torch.Tensor:
    """What the loaders returned before: per-image CHW uint8 tensors, stacked, `.float().div_(255)`."""
    return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in images]).float().div_(255.0)


def test_float_batch_is_bit_identical_to_float_div_255_for_every_pixel_value():
    images = _images()
    got = hwc_to_chw_batch(images, torch.empty(3, 3, 16, 16))
    assert got.is_contiguous() and torch.equal(got, _reference(images))
    got_u8 = hwc_to_chw_batch(images, torch.empty(3, 3, 16, 16, dtype=torch.uint8))
    assert torch.equal(got_u8.float().div_(255.0), _reference(images))


def test_collates_keep_labels_keys_and_values():
    images = _images()
    samples = [(img, label) for img, label in zip(images, (4, 0, 9))]
    x, y = collate_train(samples)
    assert x.dtype == torch.float32 and torch.equal(x, _reference(images)) and y.tolist() == [4, 0, 9]
    x8, y8 = collate_train_uint8(samples)
    assert x8.dtype == torch.uint8 and torch.equal(x8.float().div_(255.0), x) and torch.equal(y8, y)
    xe, ye, keys = collate_eval([(f"k{i}", img, label) for i, (img, label) in enumerate(samples)])
    assert torch.equal(xe, x) and torch.equal(ye, y) and keys == ["k0", "k1", "k2"]


class _Batches(IterableDataset):
    def __iter__(self):
        images = _images()
        batch = collate_train(list(zip(images, range(3))))
        yield batch[0].is_shared(), batch[0], _reference(images)


def test_a_worker_builds_its_batch_in_shared_memory():
    """Built in shared memory, the batch leaves the worker without being copied into a fresh segment."""
    (shared, got, want), = DataLoader(_Batches(), batch_size=None, num_workers=1)
    assert shared and torch.equal(got, want)
    x, _ = collate_train(list(zip(_images(), range(3))))  # outside a worker: ordinary memory
    assert not x.is_shared()


@pytest.mark.parametrize("dataset, size", [("imagenet", 24), ("cifar10", 32)])
def test_the_loaders_mirrored_copy_is_train_augment_pixel_for_pixel(dataset, size):
    """The loader crops with `train_crop` and mirrors while copying into the batch: the same pixels as
    `train_augment` (crop, then PIL's flip) for the same generator, flipped or not."""
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 45, 3), dtype=np.uint8))
    mirrored = 0
    for seed in range(12):
        want = np.asarray(train_augment(img, dataset, size, random.Random(seed)))
        crop, mirror = train_crop(img, dataset, size, random.Random(seed))
        got = to_uint8_hwc(crop, mirror)
        mirrored += mirror
        assert np.array_equal(got, want)
        batch = hwc_to_chw_batch([got], torch.empty(1, 3, size, size))
        assert torch.equal(batch, _reference([want]))
    assert 0 < mirrored < 12


def test_float_batches_reuse_a_buffer_only_once_nothing_refers_to_it():
    floats = FloatBatches()
    u8 = [torch.from_numpy(np.stack(_images(2))).permute(0, 3, 1, 2).contiguous() + k for k in (0, 1, 2, 3)]
    first = floats(u8[0])
    assert torch.equal(first, u8[0].float().div_(255.0))
    address = first.data_ptr()
    del first
    second = floats(u8[1])
    assert second.data_ptr() == address and torch.equal(second, u8[1].float().div_(255.0))  # dropped: reused
    kept_view = second[1, 2:]
    del second
    third = floats(u8[2])  # a view of the second batch is alive: its buffer is not overwritten
    assert third.data_ptr() != address and torch.equal(kept_view, u8[1][1, 2:].float().div_(255.0))
    kept_array = third.numpy()
    del third, kept_view
    fourth = floats(u8[3])
    assert torch.equal(torch.from_numpy(kept_array), u8[2].float().div_(255.0))
    assert fourth.data_ptr() == address and torch.equal(fourth, u8[3].float().div_(255.0))
