"""Reading hand-made tar shards: bad samples skipped, counted and logged; nothing unpickled; URL errors."""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile

import fsspec
import pytest
from PIL import Image

from fixtures_data import write_tar
from lipnext_scale.config import DataConfig
from lipnext_scale.data.errors import DataError
from lipnext_scale.data.shards import iter_shard_samples, make_eval_loader, make_train_loader, resolve_shards
from lipnext_scale.data.tar_reader import SkipStats

PWNED = "/tmp/lipnext-pyd-pwned"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def png(color=(250, 10, 10), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bad_shard(tmp_path):
    return write_tar(tmp_path / "mixed-000000.tar", [
        ("good.png", png()), ("good.cls", b"3"), ("good.json", b"{}"),
        ("corrupt.png", b"\x89PNG not an image"), ("corrupt.cls", b"1"),
        ("nolabel.png", png()),
        ("pickled.png", png((0, 0, 250))), ("pickled.cls", b"7"), ("pickled.pyd", pickle.dumps(_Evil())),
        ("badlabel.png", png()), ("badlabel.cls", b"seven"),
    ])


def test_bad_samples_skipped_counted_logged_never_unpickled(bad_shard, caplog):
    stats = SkipStats()
    with caplog.at_level(logging.WARNING, logger="lipnext_scale.data"):
        got = list(iter_shard_samples(str(bad_shard), image_size=32, dataset="cifar10", stats=stats))
    assert [(k, label) for k, _, label in got] == [("good", 3), ("pickled", 7)]
    assert got[0][1].shape == (3, 32, 32) and float(got[0][1][0].mean()) == pytest.approx(250 / 255)
    assert stats.total == 3 and set(stats.by_reason) == {"undecodable image", "missing .cls member",
                                                         "bad .cls member b'seven'"}
    for key in ("corrupt", "nolabel", "badlabel"):
        assert any(key in r.getMessage() and str(bad_shard) in r.getMessage() for r in caplog.records)
    assert not os.path.exists(PWNED)


def test_loader_counts_skips_and_truncated_shard(bad_shard, tmp_path):
    data = bad_shard.read_bytes()
    truncated = tmp_path / "mixed-000001.tar"
    with tarfile.open(bad_shard) as tar:
        cut = tar.getmember("corrupt.png").offset_data + 10
    truncated.write_bytes(data[:cut])  # inside the second sample: the first one survives
    loader = make_eval_loader(str(tmp_path / "mixed-{000000..000001}.tar"),
                              DataConfig(dataset="cifar10", batch_size=4, loader_processes=0), image_size=32)
    keys = [k for _, _, ks in loader for k in ks]
    assert sorted(keys) == ["good", "good", "pickled"]
    assert loader.dataset.stats.total >= 4 and not os.path.exists(PWNED)


def test_memory_url_shard(bad_shard):
    fsspec.filesystem("memory").pipe("/shards-test/mixed-000000.tar", bad_shard.read_bytes())
    urls = resolve_shards("memory://shards-test/mixed-*.tar")
    assert len(urls) == 1
    assert [k for k, _, _ in iter_shard_samples(urls[0], image_size=32, dataset="digits")] == ["good", "pickled"]


def test_unreadable_urls_fail_at_start_with_the_url(tmp_path):
    cases = {
        str(tmp_path / "train-manifest.parquet"): "does not exist",
        str(tmp_path / "train-*.tar"): "no .tar shard matches",
        str(tmp_path / "train-{000000..000002}.tar"): "3 of 3 shards",
        str(tmp_path): "is a directory",
        str(tmp_path / "nothing"): "nothing found",
        "": "empty data URL",
    }
    for url, message in cases.items():
        with pytest.raises(DataError, match=message):
            resolve_shards(url)
    with pytest.raises(DataError, match="does not exist"):
        make_train_loader(str(tmp_path / "x.tar"), DataConfig(dataset="digits", batch_size=2), image_size=32)
    with pytest.raises(ValueError, match="dataset="):
        make_train_loader(str(tmp_path / "x.tar"), DataConfig(dataset="mnist", batch_size=2), image_size=32)
    (tmp_path / "bad-manifest.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        resolve_shards(str(tmp_path / "bad-manifest.parquet"))
