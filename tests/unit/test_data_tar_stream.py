"""The streaming tar reader agrees with `tarfile` on what it accepts and rejects what is broken."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from lipnext_scale.data.tar_stream import TarError, iter_tar_members


def make_tar(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("a-directory")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    return buf.getvalue()


MEMBERS = [("k1.jpg", b"x" * 700), ("k1.cls", b"3"), ("deep/" * 30 + "k2.png", b"y" * 512), ("k2.cls", b"")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_wrote(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else MEMBERS[:2] + MEMBERS[3:]
    data = make_tar(members, fmt)
    assert list(iter_tar_members(io.BytesIO(data), lambda n: True)) == members
    assert list(iter_tar_members(io.BytesIO(gzip.compress(data)), lambda n: n.endswith(".cls"))) == \
        [m for m in members if m[0].endswith(".cls")]


def test_truncated_and_corrupt_streams_raise():
    data = make_tar(MEMBERS[:2])
    for cut in (100, 512, 600, 1536, 2560, 3072):  # inside headers and data, at header boundaries
        with pytest.raises(TarError, match="truncated"):
            list(iter_tar_members(io.BytesIO(data[:cut]), lambda n: True))
    with pytest.raises(TarError) as e:
        list(iter_tar_members(io.BytesIO(data[:600]), lambda n: True))
    assert e.value.member == "k1.jpg"
    bad = bytearray(data)
    bad[10] ^= 0xFF  # flip a byte of the first header's name
    with pytest.raises(TarError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(bad)), lambda n: True))


class _Dribble(io.BytesIO):
    """A network-like stream: each read returns at most 5 bytes; seekable only if asked."""

    def __init__(self, data: bytes, seekable: bool):
        super().__init__(data)
        self._seekable = seekable

    def read(self, n: int = -1) -> bytes:
        return super().read(5 if n is None or n < 0 else min(n, 5))

    def seekable(self) -> bool:
        return self._seekable


@pytest.mark.parametrize("seekable", [False, True])
def test_chunked_reads_short_reads_and_skips_agree_with_tarfile(monkeypatch, seekable):
    """Members and skips that straddle the reader's chunks, over a stream that gives few bytes per read."""
    import lipnext_scale.data.tar_stream as tar_stream

    monkeypatch.setattr(tar_stream, "READ_CHUNK", 700)
    monkeypatch.setattr(tar_stream, "SKIP_CHUNK", 1000)
    members = [("a.jpg", bytes(range(256)) * 9), ("a.cls", b"1"), ("b.pyd", b"z" * 5000), ("b.cls", b"2"),
               ("c.png", b"p" * 699), ("c.cls", b"3")]
    data = make_tar(members, tarfile.GNU_FORMAT)
    want = [m for m in members if not m[0].endswith(".pyd")]
    assert list(iter_tar_members(_Dribble(data, seekable), lambda n: not n.endswith(".pyd"))) == want
    assert list(iter_tar_members(_Dribble(gzip.compress(data), seekable), lambda n: True)) == members
    with pytest.raises(TarError, match="truncated"):
        list(iter_tar_members(_Dribble(data[:4000], seekable), lambda n: not n.endswith(".pyd")))


def test_header_byte_sum_is_sum():
    import os

    from lipnext_scale.data.tar_stream import _byte_sum

    for block in (bytes(512), b"\xff" * 512, bytes(range(256)) * 2, os.urandom(512), b"\xff" * 256 + bytes(256)):
        assert _byte_sum(block) == sum(block)
