"""Pure pieces of the data pipeline: work assignment, resume arithmetic, augmentation boxes, encoding."""

from __future__ import annotations

import io
import os
import pickle
import random

import numpy as np
import pytest
from PIL import Image

from lipnext_scale.data.encode import encode_image
from lipnext_scale.data.errors import DataError
from lipnext_scale.data.sources.cifar import load_array_pickle
from lipnext_scale.data.streams import eval_assignment, resume_role, shuffle_stage, stream_seed
from lipnext_scale.data.transforms import (SampleError, decode_image, eval_transform, random_resized_crop_box,
                                           to_float_chw, train_augment)


@pytest.mark.parametrize("num_shards", range(1, 8))
@pytest.mark.parametrize("num_streams", range(1, 10))
def test_eval_assignment_covers_every_sample_once(num_shards, num_streams):
    sizes = [5 + (3 * i) % 7 for i in range(num_shards)]  # uneven shard sizes
    seen = []
    for stream in range(num_streams):
        for shard, part, parts in eval_assignment(num_shards, num_streams, stream):
            seen += [(shard, i) for i in range(sizes[shard]) if i % parts == part]
    assert sorted(seen) == [(s, i) for s in range(num_shards) for i in range(sizes[s])]


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("start", [0, 1, 2, 5, 7])
def test_resume_role_reproduces_round_robin(workers, start):
    # Worker w of a fresh loader yields global batches w, w + W, w + 2W, ...; the DataLoader
    # interleaves them round-robin. A resumed loader must yield start, start + 1, ...
    for j in range(20):
        worker, t = j % workers, j // workers
        role, skip = resume_role(worker, workers, start)
        assert role + workers * (skip + t) == start + j


def test_stream_seed_is_stable_and_distinct():
    assert stream_seed("train", 0, 1) == stream_seed("train", 0, 1)
    assert stream_seed("train", 0, 1) != stream_seed("train", 1, 0)


def test_shuffle_stage_is_a_seeded_permutation():
    a = list(shuffle_stage(10, random.Random(1))(iter(range(100))))
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == list(shuffle_stage(10, random.Random(1))(iter(range(100))))


def test_random_resized_crop_box_in_bounds():
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(1, 300), rng.randint(1, 300)
        left, top, right, bottom = random_resized_crop_box(w, h, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h


def test_augment_and_eval_sizes_and_range():
    img = Image.new("RGB", (300, 256), (200, 100, 50))
    rng = random.Random(0)
    assert train_augment(img, "imagenet", 224, rng).size == (224, 224)
    assert eval_transform(img, "imagenet", 224).size == (224, 224)
    small = Image.new("RGB", (32, 32), (255, 255, 255))
    crops = [np.asarray(train_augment(small, "cifar10", 32, rng)) for _ in range(20)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    assert any((c == 0).all(axis=2).any() for c in crops)  # zero padding shows up at some offsets
    assert eval_transform(small, "digits", 32) is small      # CIFAR/digits eval: no transform
    x = to_float_chw(img)
    assert x.shape == (3, 256, 300) and x.dtype.is_floating_point and 0 <= float(x.min()) <= float(x.max()) <= 1


def _jpeg(mode: str, size=(60, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["CMYK", "L", "RGB"])
def test_encode_quirky_jpegs_to_rgb_short_side(mode):
    data, ext, orig, fmt = encode_image(_jpeg(mode), 20, "jpg", 95)
    img = Image.open(io.BytesIO(data))
    assert (ext, img.format, img.mode, img.size, orig, fmt) == ("jpg", "JPEG", "RGB", (30, 20), (60, 40), "JPEG")


def test_encode_png_under_jpeg_name_and_passthrough():
    buf = io.BytesIO()
    Image.new("RGBA", (20, 30), (1, 2, 3, 128)).save(buf, format="PNG")
    data, _, _, fmt = encode_image(buf.getvalue(), 20, "jpg", 95)
    assert fmt == "PNG" and Image.open(io.BytesIO(data)).format == "JPEG"
    rgb = _jpeg("RGB", size=(20, 33))
    assert encode_image(rgb, 20, "jpg", 95)[0] == rgb  # already the right size: kept byte for byte
    with pytest.raises(SampleError):
        encode_image(b"\xff\xd8\xff garbage", 20, "jpg", 95)
    with pytest.raises(SampleError):
        decode_image(b"\x89PNG broken")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lipnext-pwned",))


def test_cifar_unpickler_refuses_anything_but_arrays(tmp_path):
    ok = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2]}
    assert load_array_pickle(pickle.dumps(ok, protocol=2))[b"labels"] == [1, 2]
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_array_pickle(pickle.dumps({b"data": _Evil()}, protocol=2))
    assert not os.path.exists("/tmp/lipnext-pwned")


def test_config_accepts_exactly_the_loader_datasets():
    """The config's dataset choices are the data sets the pipeline can prepare (a source lister in
    data/sources) and augment, and the config refuses anything else."""
    from lipnext_scale.config import ConfigError, DataConfig, Dataset, choices
    from lipnext_scale.data.sources import KINDS, list_source
    from lipnext_scale.data.transforms import RESIZED_CROP_DATASETS

    configured = set(choices(Dataset))
    assert configured == set(KINDS)  # `lipnext prep` makes shards of each, and of nothing else
    assert set(RESIZED_CROP_DATASETS) <= configured  # no augmentation rule for a data set nobody can pick
    img = Image.new("RGB", (40, 30), (90, 120, 200))
    for name in sorted(configured):
        DataConfig(dataset=name).validate()
        with pytest.raises(Exception) as raised:  # no source here: the lister for `name` says so
            list_source(name, "/nonexistent/lipnext-source")
        assert "unknown data set kind" not in str(raised.value), raised.value
        assert train_augment(img, name, 16, random.Random(0)).size == (16, 16), name
        assert eval_transform(img, name, 16).size == (16, 16), name
    with pytest.raises(ConfigError, match="data.dataset"):
        DataConfig(dataset="mnist").validate()
