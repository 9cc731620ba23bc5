"""Prep with real Ray tasks from generated sources in every layout; resume; determinism; CLI."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fixtures_data as fx
from lipnext_scale.data.errors import DataError
from lipnext_scale.data.manifest import manifest_meta, manifest_rows, read_manifest, write_manifest
from lipnext_scale.data.prep import ShardFormat, prepare
from lipnext_scale.data.shards import resolve_shards
from lipnext_scale.data.tar_reader import SkipStats, iter_raw_samples

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def read_split(out: str, split: str) -> list:
    stats = SkipStats()
    samples = [s for url in resolve_shards(f"{out}/{split}-manifest.parquet") for s in iter_raw_samples(url, stats)]
    assert stats.total == 0
    return samples


def check_manifest(out: Path, split: str, num_samples: int) -> None:
    table = read_manifest(str(out / f"{split}-manifest.parquet"))
    assert manifest_meta(table)["complete"] is True
    rows = manifest_rows(table)
    assert sum(r["samples"] for r in rows) == num_samples
    assert all(sum(r["class_counts"]) == r["samples"] for r in rows)


@pytest.mark.parametrize("layout", ["folders", "cls_loc", "archives"])
def test_imagenet_layouts_give_sorted_wnid_labels_rgb_jpegs(ray_local, tmp_path, layout):
    expected = getattr(fx, f"make_imagenet_{layout}")(tmp_path / "src")
    out = tmp_path / "out"
    summary = prepare("imagenet", str(tmp_path / "src"), str(out), ShardFormat(shard_size=4, image_size=16),
                      progress=False)
    assert summary["files_skipped"] == 1 and "undecodable" in summary["files_skipped_examples"][0][1]
    assert json.loads((out / "classes.json").read_text())["classes"] == fx.SORTED_WNIDS
    for split in ("train", "val"):
        samples = read_split(str(out), split)
        assert Counter(s.key for s in samples) == Counter(list(expected[split]))
        check_manifest(out, split, len(samples))
        for s in samples:
            meta = json.loads(s.members["json"])
            assert meta["class"] == expected[split][s.key]
            assert int(s.members["cls"]) == fx.SORTED_WNIDS.index(expected[split][s.key])
            img = Image.open(io.BytesIO(s.members["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == 16
            w, h = meta["original_size"]
            assert img.size == (round(w * 16 / min(w, h)), round(h * 16 / min(w, h)))
    quirks = {json.loads(s.members["json"])["original_format"] for s in read_split(str(out), "train")}
    assert {"JPEG", "PNG"} <= quirks


def test_tiny_imagenet_keeps_right_sized_jpegs_byte_exact(ray_local, tmp_path):
    expected = fx.make_tiny_imagenet(tmp_path / "src")
    out = tmp_path / "out"
    prepare("tiny-imagenet", str(tmp_path / "src"), str(out), ShardFormat(shard_size=3), progress=False)
    for split in ("train", "val"):
        samples = read_split(str(out), split)
        assert {s.key: fx.SORTED_WNIDS[int(s.members["cls"])] for s in samples} == expected[split]
        for s in samples:
            origin = json.loads(s.members["json"])["origin"]
            assert s.members["jpg"] == (tmp_path / "src" / "tiny-imagenet-200" / origin).read_bytes()


@pytest.mark.parametrize("kind,fmt", [("cifar10", "python"), ("cifar10", "binary"), ("cifar100", "python"),
                                      ("cifar100", "binary")])
def test_cifar_release_archives_lossless(ray_local, tmp_path, kind, fmt):
    archive, expected = fx.make_cifar(tmp_path, kind, fmt)
    out = tmp_path / "out"
    prepare(kind, str(archive), str(out), ShardFormat(shard_size=8), progress=False)
    for split in ("train", "val"):
        samples = read_split(str(out), split)
        assert len(samples) == len(expected[split])
        for s, (pixels, label) in zip(samples, expected[split]):
            assert int(s.members["cls"]) == label
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(s.members["png"]))), pixels)


def test_interrupted_prep_resumes_without_duplicates_or_losses(ray_local, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    prepare("digits", None, str(first), ShardFormat(shard_size=200), progress=False)
    shutil.copytree(first, second)
    # The state an interruption leaves: a manifest listing only some shards (not complete), a shard
    # missing, a truncated one, a temporary file of a shard being written.
    table = read_manifest(str(second / "train-manifest.parquet"))
    rows = manifest_rows(table)
    write_manifest(str(second / "train-manifest.parquet"), rows[:4], {**manifest_meta(table), "complete": False})
    (second / "train-000005.tar").unlink()
    (second / "train-000001.tar").write_bytes((second / "train-000001.tar").read_bytes()[:5000])
    (second / "train-000006.tar.tmp-0123456789ab").write_bytes(b"half written")
    with pytest.raises(DataError, match="incomplete"):
        resolve_shards(str(second / "train-manifest.parquet"))

    summary = prepare("digits", None, str(second), ShardFormat(shard_size=200), progress=False)
    train = summary["splits"]["train"]
    assert (train["shards"], train["shards_skipped"], train["shards_written"]) == (8, 3, 5)
    assert summary["splits"]["val"]["shards_written"] == 0
    assert not list(second.glob("*.tmp-*"))
    # Deterministic: the resumed output is byte-identical to the uninterrupted one.
    for split in ("train", "val"):
        a = manifest_rows(read_manifest(str(first / f"{split}-manifest.parquet")))
        b = manifest_rows(read_manifest(str(second / f"{split}-manifest.parquet")))
        assert [r["sha256"] for r in a] == [r["sha256"] for r in b]
    keys = [s.key for s in read_split(str(second), "train")]
    assert len(keys) == len(set(keys)) == 1497

    with pytest.raises(DataError, match="different settings"):
        prepare("digits", None, str(second), ShardFormat(shard_size=200, image_size=24), progress=False)


def test_prep_into_memory_url(ray_local):
    summary = prepare("digits", None, "memory://prep-test/digits", ShardFormat(shard_size=1000), splits=["val"],
                      progress=False)
    assert summary["splits"]["val"]["samples"] == 300
    assert len(read_split("memory://prep-test/digits", "val")) == 300


def test_cli_prep(ray_local, tmp_path, capsys):
    from lipnext_scale.cli import main

    assert main(["prep", "digits", "--out", str(tmp_path / "d"), "--splits", "val", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["val"]["samples"] == 300
    assert main(["prep", "imagenet", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_rerun_rewrites_a_same_size_corrupted_shard(ray_local, tmp_path):
    out = tmp_path / "d"
    prepare("digits", None, str(out), ShardFormat(shard_size=100), splits=["val"], progress=False)
    shard = out / "val-000001.tar"
    good = shard.read_bytes()
    fx.flip_label_same_size(shard, read_split(str(out), "val")[100].key)
    assert shard.read_bytes() != good and len(shard.read_bytes()) == len(good)
    summary = prepare("digits", None, str(out), ShardFormat(shard_size=100), splits=["val"], progress=False)
    assert (summary["splits"]["val"]["shards_skipped"], summary["splits"]["val"]["shards_written"]) == (2, 1)
    assert shard.read_bytes() == good


def test_dangling_symlinks_are_counted_in_the_summary(ray_local, tmp_path):
    expected = fx.make_imagenet_folders(tmp_path / "src")
    (tmp_path / "src" / "train" / fx.WNIDS[0] / "dangling.JPEG").symlink_to(tmp_path / "gone.JPEG")
    summary = prepare("imagenet", str(tmp_path / "src"), str(tmp_path / "out"),
                      ShardFormat(shard_size=4, image_size=16), progress=False)
    assert summary["files_skipped_by_reason"] == {"dangling symlink": 1, "undecodable source image": 1}
    assert Counter(s.key for s in read_split(str(tmp_path / "out"), "train")) == Counter(list(expected["train"]))
