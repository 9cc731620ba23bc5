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
