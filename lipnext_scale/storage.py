"""Every byte the library reads or writes goes through here: fsspec URLs, one opener, one atomic writer.

Atomic means: bytes go to a temporary sibling name, then are renamed, so a reader (or a resumed job) never
sees a half-written file under its final name. On object stores a single PUT is already atomic and `mv`
is copy + delete of the temporary object. A directory (an export, a checkpoint) is written under a
temporary sibling name and moved into place only when complete (`atomic_write_tree`).

This module sits at the bottom of the import graph (beside `config`): it imports fsspec and nothing of
ours, so the model, the optimizer, checkpoints, data, training and certification can all use it.
Each caller passes its own error class, so a bad URL surfaces as that component's error with its fix.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Callable, Iterator

import fsspec


class StorageError(ValueError):
    """A URL cannot be opened or written; the message names it and the fix."""


def url_to_fs(url: str, error: type[Exception] = StorageError):
    """(filesystem, path) of an fsspec URL; an empty URL, an unknown protocol or a missing backend raises
    `error` with the fix."""
    if not isinstance(url, str) or not url.strip():
        raise error(f"empty URL {url!r}: give a local path or an fsspec URL such as s3://bucket/dir")
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise error(f"cannot open {url!r}: {e}. Install the fsspec backend for this protocol "
                    "(s3fs for s3://, gcsfs for gs://) or check the URL") from None


def join_url(base: str, *parts: str) -> str:
    """`join_url("s3://b/x", "train-000000.tar")` -> "s3://b/x/train-000000.tar" (no normalisation)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def parent_url(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def is_process_local(url: str, error: type[Exception] = StorageError) -> bool:
    """True for filesystems that live inside one process (memory://): other processes cannot write them."""
    fs, _ = url_to_fs(url, error)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "memory" in protocols


def exists(url: str, error: type[Exception] = StorageError) -> bool:
    fs, path = url_to_fs(url, error)
    return fs.exists(path)


@contextlib.contextmanager
def open_url(url: str, mode: str = "rb", error: type[Exception] = StorageError) -> Iterator:
    """The one opener: `with open_url(u) as f`. A missing file or an unreadable location raises `error`
    naming the URL (errors raised by the caller's own code inside the block pass through unchanged)."""
    fs, path = url_to_fs(url, error)
    try:
        f = fs.open(path, mode)
    except FileNotFoundError:
        raise error(f"{url!r} does not exist") from None
    except (PermissionError, IsADirectoryError, NotADirectoryError, OSError) as e:
        raise error(f"cannot open {url!r} ({type(e).__name__}: {e})") from None
    with f:
        yield f


def read_bytes(url: str, error: type[Exception] = StorageError) -> bytes:
    with open_url(url, "rb", error) as f:
        return f.read()


def atomic_write_bytes(url: str, data: bytes, error: type[Exception] = StorageError) -> None:
    """Write `data` to `url` via a temporary sibling name and a rename; a failure leaves the old file."""
    fs, path = url_to_fs(url, error)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except OSError as e:
        _remove_quietly(fs, tmp)
        raise error(f"cannot write {url!r} ({type(e).__name__}: {e}); check the path and its permissions") from None
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


def atomic_write_tree(url: str, write: Callable[[object, str], None], *, replace: bool = False,
                      error: type[Exception] = StorageError) -> None:
    """Build a directory at `url` in one step: `write(fs, tmp_path)` fills a temporary sibling directory,
    which is then moved to `url`. With `replace`, an existing directory is moved aside first and deleted
    only after the new one is in place (a crash leaves either the old or the new tree, plus a `.old-*`
    sibling to clean up, never neither)."""
    fs, path = url_to_fs(url, error)
    path = path.rstrip("/")
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    old = None
    try:
        fs.makedirs(tmp, exist_ok=True)
        write(fs, tmp)
        if fs.exists(path):
            if not replace:
                raise error(f"{url!r} already exists; pass the option to overwrite it or choose another path")
            old = f"{path}.old-{uuid.uuid4().hex[:12]}"
            fs.mv(path, old, recursive=True)
        fs.mv(tmp, path, recursive=True)
    except OSError as e:
        _remove_quietly(fs, tmp, recursive=True)
        if old is not None and not fs.exists(path):
            fs.mv(old, path, recursive=True)
        raise error(f"cannot write {url!r} ({type(e).__name__}: {e}); check the path and its permissions") from None
    except BaseException:
        _remove_quietly(fs, tmp, recursive=True)
        if old is not None and not fs.exists(path):
            fs.mv(old, path, recursive=True)
        raise
    if old is not None:
        _remove_quietly(fs, old, recursive=True)


def _remove_quietly(fs, path: str, recursive: bool = False) -> None:
    with contextlib.suppress(Exception):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


def versions() -> dict[str, str]:
    """Library versions recorded in every checkpoint, export and report (the installed ones only)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("lipnext_scale", "torch", "deepspeed", "ray", "safetensors", "webdataset", "fsspec", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
