"""fsspec URL helpers: join, existence, atomic writes. Every data path in this package is an fsspec URL.

Atomic means: bytes go to a temporary name in the destination directory, then are renamed, so a
reader (or a resumed prep) never sees a half-written file under its final name. On object stores
a single PUT is already atomic and `mv` is copy + delete of the temporary object.
"""

from __future__ import annotations

import uuid

import fsspec


class DataError(ValueError):
    """A data URL, shard, source layout or manifest is wrong; the message names it and the fix."""


def url_to_fs(url: str, error: type[Exception] = DataError):
    """(filesystem, path) of an fsspec URL; an unknown protocol or a missing backend raises `error`."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise error(f"cannot open {url!r}: {e}. Install the fsspec backend for this protocol "
                    "(s3fs for s3://, gcsfs for gs://) or check the URL") from e


def join_url(base: str, *parts: str) -> str:
    """`join_url("s3://b/x", "train-000000.tar")` -> "s3://b/x/train-000000.tar" (no normalisation)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def parent_url(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def is_process_local(url: str) -> bool:
    """True for filesystems that live inside one process (memory://): other processes cannot write them."""
    fs, _ = url_to_fs(url)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "memory" in protocols


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise DataError(f"{url!r} does not exist") from e


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` via a temporary sibling name and a rename."""
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        finally:
            raise
