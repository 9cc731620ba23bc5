"""Data reliability without Ray: symlinked sources, injective keys, manifest sha256 checks, bounded memory
for skipped members and oversized images, one-line prep errors."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import tracemalloc
import zlib
from dataclasses import replace

import pytest
from PIL import Image

import fixtures_data as fx
from lipnext_scale.config import DataConfig
from lipnext_scale.data.errors import DataError
from lipnext_scale.data.manifest import file_digest, write_manifest
from lipnext_scale.data.prep import build_shard
from lipnext_scale.data.shards import LoaderRuntime, iter_shard_samples, make_eval_loader, make_train_loader
from lipnext_scale.data.sources import list_source
from lipnext_scale.data.sources.base import safe_key
from lipnext_scale.data.tar_reader import SkipStats, iter_raw_samples
from lipnext_scale.data.transforms import SampleError, decode_image


def png(color=(250, 10, 10), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ---- 1. symlinks in folder sources


def test_symlinked_class_folders_and_images_are_followed_dangling_ones_counted_labels_kept(tmp_path):
    elsewhere, train = tmp_path / "elsewhere", tmp_path / "src" / "train"
    (elsewhere / "n02000002").mkdir(parents=True)
    for j in range(2):
        (elsewhere / "n02000002" / f"n02000002_{j}.JPEG").write_bytes(fx.jpeg_bytes(fx.class_color(2)))
    (elsewhere / "linked.JPEG").write_bytes(fx.jpeg_bytes(fx.class_color(3)))
    for wnid in ("n01000001", "n03000003"):
        (train / wnid).mkdir(parents=True)
        (train / wnid / f"{wnid}_0.JPEG").write_bytes(fx.jpeg_bytes(fx.class_color(0)))
    (train / "n02000002").symlink_to(elsewhere / "n02000002", target_is_directory=True)
    (train / "n01500000").symlink_to(tmp_path / "gone", target_is_directory=True)  # a dangling class folder
    (train / "n03000003" / "n03000003_1.JPEG").symlink_to(elsewhere / "linked.JPEG")
    (train / "n03000003" / "n03000003_2.JPEG").symlink_to(tmp_path / "gone.JPEG")  # a dangling image

    plan = list_source("imagenet", str(tmp_path / "src"))
    assert plan.classes == ["n01000001", "n01500000", "n02000002", "n03000003"]  # the dangling class keeps its place
    assert {s.key: s.label for s in plan.splits["train"]} == {
        "n01000001_0": 0, "n02000002_0": 2, "n02000002_1": 2, "n03000003_0": 3, "n03000003_1": 3}
    linked = next(s for s in plan.splits["train"] if s.key == "n03000003_1")
    assert linked.ref.read() == (elsewhere / "linked.JPEG").read_bytes()
    assert sorted((os.path.basename(o), r) for o, r in plan.skipped) == [
        ("n01500000", "dangling symlink"), ("n03000003_2.JPEG", "dangling symlink")]


# ---- 3. injective sample keys


def test_safe_key_is_injective_and_leaves_imagenet_names_alone():
    names = ["a.b.c", "a_b_c", "a b c", "a/b/c", "a%2Eb%2Ec", "a%b", "a%25b", "a-b~c", "ünï", "a.b_c", "a_b.c"]
    keys = [safe_key(n) for n in names]
    assert len(set(keys)) == len(names)
    assert not any(c in k for k in keys for c in "./ ")
    for name in ("n01440764_10026", "ILSVRC2012_val_00000001", "val_17"):
        assert safe_key(name) == name


def test_dotted_and_underscored_names_stay_two_samples(tmp_path):
    cls = tmp_path / "src" / "train" / "n01000001"
    cls.mkdir(parents=True)
    (cls / "a.b.c.JPEG").write_bytes(fx.jpeg_bytes((200, 0, 0)))
    (cls / "a_b_c.JPEG").write_bytes(fx.jpeg_bytes((0, 0, 200)))
    plan = list_source("imagenet", str(tmp_path / "src"))
    settings = {"image_size": 16, "image_format": "jpg", "quality": 95, "num_classes": 1, "classes": plan.classes}
    data, stats = build_shard(plan.splits["train"], settings)
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(data)
    samples = list(iter_raw_samples(str(shard), SkipStats()))
    assert stats["samples"] == len(samples) == 2 and len({s.key for s in samples}) == 2

    (cls / "a_b_c.png").write_bytes(png())  # same stem, other extension: refused, naming both files
    with pytest.raises(DataError, match=r"a_b_c\.JPEG.*a_b_c\.png.*rename one"):
        list_source("imagenet", str(tmp_path / "src"))


# ---- 2. the manifest's sha256 is checked while reading


def _key_in(shard) -> str:
    return next(iter_raw_samples(str(shard), SkipStats())).key


def test_same_size_corruption_of_a_listed_shard_is_an_error_naming_it_and_the_fix(tmp_path):
    from lipnext_scale.certify.data_access import iter_shard_samples as certify_samples
    from lipnext_scale.certify.model_loading import CertifyError

    shards = fx.prepared_digits(tmp_path, "val", shard_size=100)
    manifest = str(tmp_path / "val-manifest.parquet")
    data = DataConfig(dataset="digits", batch_size=50, loader_processes=0)
    assert sum(len(k) for _, _, k in make_eval_loader(manifest, data, image_size=32)) == 300  # intact: reads through
    size = shards[1].stat().st_size
    fx.flip_label_same_size(shards[1], _key_in(shards[1]))
    assert shards[1].stat().st_size == size

    message = r"val-000001\.tar.*does not match its manifest .*sha256.*re-run the `lipnext prep`"
    for url in (manifest, str(tmp_path / "val-*.tar"), str(tmp_path / "val")):  # however the shards are named
        with pytest.raises(DataError, match=message):
            list(make_eval_loader(url, data, image_size=32))
    with pytest.raises(DataError, match=message) as raised:  # from a DataLoader worker: still one line
        list(make_eval_loader(manifest, replace(data, loader_processes=2), image_size=32))
    assert "\n" not in str(raised.value)
    with pytest.raises(DataError, match=message):
        list(iter_shard_samples(str(shards[1]), image_size=32, dataset="digits"))
    with pytest.raises(CertifyError, match=message):
        list(certify_samples(str(shards[1])))
    assert len(list(certify_samples(str(shards[0])))) == 100
    # training (issue 25): the corrupt shard is a counted skip, none of its samples used; the run goes on
    loader = make_train_loader(manifest, replace(data, shuffle_buffer=0), image_size=32,
                               runtime=LoaderRuntime(deterministic=True))
    train = iter(loader)
    for _ in range(60):  # 30 shard draws: the corrupt one comes up
        next(train)
    assert set(loader.dataset.stats.by_reason) == {"whole shard not used"}  # each draw, logged with its sha256


def test_a_truncated_listed_shard_is_an_error_not_a_skip(tmp_path):
    shards = fx.prepared_digits(tmp_path, "val", shard_size=100)
    shards[2].write_bytes(shards[2].read_bytes()[:20000])
    with pytest.raises(DataError, match=r"val-000002\.tar.*does not match its manifest.*truncated"):
        list(make_eval_loader(str(tmp_path / "val-manifest.parquet"),
                              DataConfig(dataset="digits", batch_size=50, loader_processes=0), image_size=32))


# ---- 13. bounded memory: skipped members by seek, oversized members and images refused


def _sparse_tar(path, big_name: str, big_size: int, tail: list[tuple[str, bytes]]):
    """A tar whose first member is `big_size` zero bytes left as a hole in the file (no disk used), then `tail`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in tail:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    head = tarfile.TarInfo(big_name)
    head.size = big_size
    with open(path, "wb") as f:
        f.write(head.tobuf(format=tarfile.USTAR_FORMAT))
        f.seek(-(-big_size // 512) * 512, io.SEEK_CUR)
        f.write(buf.getvalue())
    return path


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("with_manifest", [False, True])
def test_a_skipped_400mb_member_is_never_held_in_memory(tmp_path, with_manifest):
    shard = _sparse_tar(tmp_path / "big-000000.tar", "evil.pyd", 96 << 20, [("good.png", png()), ("good.cls", b"3")])
    if with_manifest:  # the hashing path reads every byte, in bounded chunks
        d = file_digest(str(shard))
        write_manifest(str(tmp_path / "big-manifest.parquet"),
                       [{"split": "big", "index": 0, "shard": shard.name, "samples": 1, "bytes": d.bytes,
                         "sha256": d.sha256, "class_counts": [0, 0, 0, 1], "plan_digest": ""}], {"complete": True})
    keys = []
    peak = _peak_bytes(lambda: keys.extend(k for k, _, _ in iter_shard_samples(str(shard), image_size=8,
                                                                               dataset="digits")))
    assert keys == ["good"] and peak < 8 << 20


def test_oversized_selected_member_is_a_counted_skip(tmp_path, monkeypatch):
    import lipnext_scale.data.tar_reader as tar_reader

    noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    monkeypatch.setattr(tar_reader, "MAX_MEMBER_BYTES", 2000)
    shard = fx.write_tar(tmp_path / "m-000000.tar", [("big.png", buf.getvalue()), ("big.cls", b"1"),
                                                      ("small.png", png()), ("small.cls", b"2")])
    stats = SkipStats()
    assert [k for k, _, _ in iter_shard_samples(str(shard), image_size=8, dataset="digits", stats=stats)] == ["small"]
    assert dict(stats.by_reason) == {"oversized .png member": 1}


def huge_png(width: int, height: int) -> bytes:
    """A black grayscale PNG: a few hundred KB that would decode to width x height bytes (x3 as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row = zlib.compressobj(9), bytes(width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_small_png_of_9500_squared_pixels_is_refused_before_decoding(tmp_path):
    bomb = huge_png(9500, 9500)
    assert len(bomb) < 1 << 20
    with pytest.raises(SampleError, match=r"too large to decode \(9500x9500 pixels, over MAX_DECODED_PIXELS"):
        decode_image(bomb)
    shard = fx.write_tar(tmp_path / "b-000000.tar", [("bomb.png", bomb), ("bomb.cls", b"1"),
                                                      ("ok.png", png()), ("ok.cls", b"2")])
    stats = SkipStats()
    assert [k for k, _, _ in iter_shard_samples(str(shard), image_size=8, dataset="digits", stats=stats)] == ["ok"]
    assert dict(stats.by_reason) == {"image too large to decode": 1}


# ---- 5, 11. prep refuses a bad --out or --workers with one line, before any work


def test_prep_bad_out_and_workers_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from lipnext_scale.cli import main

    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["--out", ""], "output URL '' is empty"),
        (["--out", "  "], "is empty"),
        (["--out", str(a_file / "out")], f"cannot create the output directory '{a_file / 'out'}'"),
        (["--out", str(a_file)], f"cannot create the output directory '{a_file}'"),
        (["--out", "nosuchprotocol://bucket/x"], "cannot open 'nosuchprotocol://bucket/x'"),
        (["--out", str(tmp_path / "ok"), "--workers", "-3"], "workers=-3"),
        (["--out", str(tmp_path / "ok"), "--workers", "0"], "workers=0"),
    ]
    for extra, message in cases:
        assert main(["prep", "digits", "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written anywhere
