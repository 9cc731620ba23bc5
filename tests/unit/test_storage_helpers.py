"""storage.py's helpers, the one I/O home (issue 24): list, glob, find, move, remove, JSON, checksums.

Local paths and memory:// (the process-local fsspec backend); a flaky filesystem stands in for an object
store that fails a request now and then. Every failure is one line naming the URL and the fix.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from lipnext_scale import storage
from lipnext_scale.storage import (
    Digest, HashingReader, StorageError, atomic_write_bytes, atomic_write_files, digest, file_digest, find_files,
    file_size, glob, is_dir, is_file, list_dir, makedirs, move, parse_json, read_bytes, read_json, remove,
    verify_digest, write_json,
)


class Refused(ValueError):
    pass


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=3, first_delay_s=0.001, max_delay_s=0.001))


def test_list_dir_names_types_sizes_and_missing(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    got = {e.name: (e.type, e.url) for e in list_dir(str(tmp_path))}
    assert got == {"a.txt": ("file", f"{tmp_path}/a.txt"), "sub": ("directory", f"{tmp_path}/sub"),
                   "gone": ("dangling", f"{tmp_path}/gone"), "link": ("directory", f"{tmp_path}/link")}
    assert {e.name: e.size for e in list_dir(str(tmp_path))}["a.txt"] == 3
    assert list_dir(str(tmp_path / "missing"), missing_ok=True) == []
    with pytest.raises(Refused, match=r"missing' does not exist or is not a directory"):
        list_dir(str(tmp_path / "missing"), Refused)


def test_glob_find_kinds_and_size():
    base = "memory://io-home/glob"
    for name in ("x-000.tar", "x-001.tar", "x.json", "deep/er/y.bin"):
        atomic_write_bytes(f"{base}/{name}", b"12345")
    assert glob(f"{base}/x-*.tar") == ["memory:///io-home/glob/x-000.tar", "memory:///io-home/glob/x-001.tar"]
    assert sorted(find_files(base)) == [f"{base}/{n}" for n in ("deep/er/y.bin", "x-000.tar", "x-001.tar", "x.json")]
    assert is_dir(base) and not is_file(base) and is_file(f"{base}/x.json") and not is_dir(f"{base}/x.json")
    assert not is_dir(f"{base}/nothing") and not is_file(f"{base}/nothing")
    assert file_size(f"{base}/x.json") == 5
    with pytest.raises(Refused, match="nothing' does not exist"):
        file_size(f"{base}/nothing", Refused)


def test_makedirs_move_remove(tmp_path):
    makedirs(str(tmp_path / "a" / "b"))
    makedirs(str(tmp_path / "a" / "b"))  # exists: nothing to do
    (tmp_path / "a" / "b" / "f").write_bytes(b"x")
    move(str(tmp_path / "a"), str(tmp_path / "moved"))
    assert (tmp_path / "moved" / "b" / "f").read_bytes() == b"x" and not (tmp_path / "a").exists()
    with pytest.raises(Refused, match=r"'.*/a' does not exist \(moving it to"):
        move(str(tmp_path / "a"), str(tmp_path / "again"), Refused)
    remove(str(tmp_path / "moved"), recursive=True)
    assert not (tmp_path / "moved").exists()
    remove(str(tmp_path / "moved"), recursive=True, missing_ok=True)  # another remover got there first
    with pytest.raises(Refused, match="moved' does not exist"):
        remove(str(tmp_path / "moved"), Refused)


def test_json_round_trip_and_one_line_errors(tmp_path):
    url = str(tmp_path / "d" / "status.json")
    write_json(url, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert read_json(url, "unused") == {"a": [1, 2], "b": 1}
    assert (tmp_path / "d" / "status.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}'
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["status.json"]  # no temporary file left
    assert read_json(str(tmp_path / "none.json"), "unused", missing_ok=True) is None
    with pytest.raises(Refused, match=r"none.json' does not exist"):
        read_json(str(tmp_path / "none.json"), "unused", Refused)
    (tmp_path / "bad.json").write_bytes(b'{"cut": ')
    with pytest.raises(Refused) as e:
        read_json(str(tmp_path / "bad.json"), "write it again", Refused)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"'{tmp_path}/bad.json' is not valid JSON (")
    assert str(e.value).endswith("; write it again")
    with pytest.raises(Refused, match=r"^here is not valid JSON \(UnicodeDecodeError: .*\); fix it$"):
        parse_json(b"\xff\xfe", "here", "fix it", Refused)


def test_checksums(tmp_path):
    data = b"lipnext" * 1000
    (tmp_path / "f").write_bytes(data)
    d = digest(data)
    assert d == Digest(7000, hashlib.sha256(data).hexdigest())
    assert file_digest(str(tmp_path / "f")) == d
    with open(tmp_path / "f", "rb") as raw:
        reader = HashingReader(raw)
        assert reader.read(10) == data[:10] and not reader.seekable()
        assert reader.finish() == d  # the rest is hashed too
    verify_digest(d, Digest(d.bytes, d.sha256), lambda what: Refused(what))  # equal: nothing raised
    with pytest.raises(Refused, match=r"^f is corrupt \(7000 bytes, sha256 [0-9a-f]{16}\.\.\. where the manifest "
                                      r"has 6999 bytes, 0000000000000000\.\.\.\); copy it again$"):
        verify_digest(d, Digest(6999, "0" * 64), lambda what: Refused(f"f is corrupt ({what}); copy it again"))
    with pytest.raises(Refused, match="nothing' does not exist"):
        file_digest(str(tmp_path / "nothing"), Refused)


def test_atomic_write_files(tmp_path):
    out = str(tmp_path / "export")
    atomic_write_files(out, {"a.json": b"{}", "w.bin": b"\0\1"})
    assert sorted(os.listdir(out)) == ["a.json", "w.bin"]
    with pytest.raises(Refused, match="already exists"):
        atomic_write_files(out, {"a.json": b"[]"}, error=Refused)
    atomic_write_files(out, {"a.json": b"[]"}, replace=True)
    assert sorted(os.listdir(out)) == ["a.json"] and sorted(os.listdir(tmp_path)) == ["export"]


class _Flaky:
    """A filesystem whose first call of each listed method fails with a transient error."""

    def __init__(self, fs, methods):
        self.fs, self.failing = fs, set(methods)

    def __getattr__(self, name):
        attr = getattr(self.fs, name)
        if name not in self.failing:
            return attr

        def call(*a, **k):
            if name in self.failing:
                self.failing.discard(name)
                raise ConnectionError(f"{name}: connection reset")
            return attr(*a, **k)

        return call


def test_transient_errors_are_retried_permanent_ones_are_not(tmp_path, monkeypatch):
    (tmp_path / "f.json").write_text('{"ok": true}')
    real = storage.url_to_fs

    def flaky(url, error=StorageError):
        fs, path = real(url, error)
        return _Flaky(fs, {"ls", "info", "rm", "mv", "makedirs", "glob", "find"}), path

    monkeypatch.setattr(storage, "url_to_fs", flaky)
    assert [e.name for e in list_dir(str(tmp_path))] == ["f.json"]
    assert is_file(str(tmp_path / "f.json"))
    assert glob(f"{tmp_path}/*.json") == [f"file://{tmp_path}/f.json"]
    assert find_files(str(tmp_path)) == [f"{tmp_path}/f.json"]
    makedirs(str(tmp_path / "d"))
    move(str(tmp_path / "f.json"), str(tmp_path / "d" / "f.json"))
    assert read_json(str(tmp_path / "d" / "f.json"), "unused") == {"ok": True}
    remove(str(tmp_path / "d"), recursive=True)
    assert not (tmp_path / "d").exists()

    def refused(url, error=StorageError):
        fs, path = real(url, error)

        class NoAccess(_Flaky):
            def __getattr__(self, name):
                if name == "ls":
                    def ls(*a, **k):
                        raise PermissionError(13, "Permission denied")
                    return ls
                return getattr(self.fs, name)

        return NoAccess(fs, ()), path

    monkeypatch.setattr(storage, "url_to_fs", refused)
    with pytest.raises(Refused) as e:
        list_dir(str(tmp_path), Refused)
    assert str(e.value) == (f"cannot list {str(tmp_path)!r} (PermissionError: [Errno 13] Permission denied); "
                            "check the path and its permissions")


def test_read_bytes_missing_ok(tmp_path):
    assert read_bytes(str(tmp_path / "nothing"), missing_ok=True) is None
    (tmp_path / "x").write_bytes(b"1")
    assert read_bytes(str(tmp_path / "x")) == b"1"


def test_check_url_and_file_in_the_way(tmp_path):
    storage.check_url(str(tmp_path))  # a usable URL: nothing
    with pytest.raises(StorageError, match="cannot open 'nosuch://x'"):
        storage.check_url("nosuch://x")
    with pytest.raises(StorageError, match="empty URL"):
        storage.check_url("")
    (tmp_path / "file").write_text("x")
    assert storage.file_in_the_way(str(tmp_path / "new" / "dir")) is None  # only missing parts: can be made
    assert storage.file_in_the_way(str(tmp_path)) is None  # an existing directory
    assert storage.file_in_the_way(str(tmp_path / "file")) == str(tmp_path / "file")  # the URL itself
    assert storage.file_in_the_way(str(tmp_path / "file" / "a" / "b")) == str(tmp_path / "file")  # a parent
