"""The streaming loader on real digits shards written by real Ray prep tasks."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import fsspec
import pytest
import torch

from lipnext_scale.config import DataConfig
from lipnext_scale.data.prep import ShardFormat, prepare
from lipnext_scale.data.shards import (LoaderRuntime, iter_shard_samples, make_eval_loader, make_train_loader,
                                        resolve_shards)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def digits(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    summary = prepare("digits", None, str(out), ShardFormat(shard_size=400), workers=2, progress=False)
    assert summary["splits"]["train"]["samples"] == 1497 and summary["splits"]["val"]["samples"] == 300
    return out


def all_keys(urls):
    return [k for u in urls for k, _, _ in iter_shard_samples(u, image_size=32, dataset="digits")]


def test_train_batches_are_float_images_and_labels(digits):
    from sklearn.datasets import load_digits

    loader = make_train_loader(str(digits / "train-manifest.parquet"),
                               DataConfig(dataset="digits", batch_size=32, loader_processes=2, seed=0), image_size=32,
                               runtime=LoaderRuntime(rank=0, world_size=1))
    it = iter(loader)
    for _ in range(3):
        images, labels = next(it)
        assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
        assert labels.shape == (32,) and labels.dtype == torch.int64
        assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.5
        assert labels.min() >= 0 and labels.max() <= 9
    target = load_digits().target
    for key, image, label in iter_shard_samples(str(digits / "val-000000.tar"), image_size=32, dataset="digits"):
        assert label == target[int(key.split("_")[1])]
        assert image.shape == (3, 32, 32) and torch.equal(image[0], image[1])  # gray stored as RGB


@pytest.mark.parametrize("start", [1, 4, 5])
def test_deterministic_resume_is_exact(digits, start):
    data = DataConfig(dataset="digits", batch_size=16, loader_processes=2, seed=7, shuffle_buffer=64)
    runtime = LoaderRuntime(rank=1, world_size=2, deterministic=True)
    url = str(digits / "train-manifest.parquet")
    it = iter(make_train_loader(url, data, image_size=32, runtime=runtime))
    full = [next(it) for _ in range(start + 3)]
    it = iter(make_train_loader(url, data, image_size=32, runtime=replace(runtime, start_batch=start)))
    for want in full[start:]:
        got = next(it)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_uint8_batches_normalise_to_the_float_batches(digits):
    """Issue 14: the training loop takes uint8 batches (pinned on a GPU host) and normalises on the device;
    the values it trains on are bit-identical to the float loader's."""
    url = str(digits / "train-manifest.parquet")
    data = DataConfig(dataset="digits", batch_size=16, loader_processes=0, seed=3, shuffle_buffer=64)
    runtime = LoaderRuntime(rank=0, world_size=1, deterministic=True)
    floats = iter(make_train_loader(url, data, image_size=32, runtime=runtime))
    raw = iter(make_train_loader(url, data, image_size=32, runtime=replace(runtime, uint8=True)))
    for _ in range(3):
        (want, want_labels), (got, got_labels) = next(floats), next(raw)
        assert got.dtype == torch.uint8 and torch.equal(got_labels, want_labels)
        assert torch.equal(got.float().div_(255.0), want)


def test_seed_and_rank_change_the_stream(digits):
    url = str(digits / "train-manifest.parquet")
    def first_batch(rank: int, seed: int):
        data = DataConfig(dataset="digits", batch_size=16, loader_processes=0, seed=seed)
        runtime = LoaderRuntime(rank=rank, world_size=2, deterministic=True)
        return next(iter(make_train_loader(url, data, image_size=32, runtime=runtime)))[0]

    a, b, c = first_batch(rank=0, seed=0), first_batch(rank=0, seed=1), first_batch(rank=1, seed=0)
    assert not torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("pattern", ["val-manifest.parquet", "train-{000000..000003}.tar", "train-00000[0-2].tar"])
def test_eval_two_ranks_two_workers_each_key_once(digits, pattern):
    url = str(digits / pattern)
    keys = Counter()
    for rank in range(2):
        loader = make_eval_loader(url, DataConfig(dataset="digits", batch_size=50, loader_processes=2), image_size=32,
                                  runtime=LoaderRuntime(rank=rank, world_size=2))
        for images, labels, batch_keys in loader:
            assert images.shape[0] == labels.shape[0] == len(batch_keys) <= 50
            keys.update(batch_keys)
    expected = all_keys(resolve_shards(url))
    assert len(expected) == len(set(expected)) > 0
    assert set(keys) == set(expected) and set(keys.values()) == {1}


def test_reads_through_memory_url(digits):
    fs = fsspec.filesystem("memory")
    for name in ("val-000000.tar", "val-manifest.parquet"):
        fs.pipe(f"/digits-copy/{name}", (digits / name).read_bytes())
    loader = make_eval_loader("memory://digits-copy/val-manifest.parquet",
                              DataConfig(dataset="digits", batch_size=64, loader_processes=0), image_size=32)
    keys = [k for _, _, ks in loader for k in ks]
    assert len(keys) == 300 and len(set(keys)) == 300
    data = DataConfig(dataset="digits", batch_size=8, loader_processes=0)
    train = make_train_loader("memory://digits-copy/val", data, image_size=32)
    assert next(iter(train))[0].shape == (8, 3, 32, 32)
