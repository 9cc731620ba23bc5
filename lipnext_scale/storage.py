"""Every byte the library reads or writes goes through here: fsspec URLs, one opener, one atomic writer.

Atomic means: bytes go to a temporary sibling name, then are renamed, so a reader (or a resumed job) never
sees a half-written file under its final name. On object stores a single PUT is already atomic and `mv`
is copy + delete of the temporary object. A directory (an export, a checkpoint) is written under a
temporary sibling name and moved into place only when complete (`atomic_write_tree`).

Object stores fail a request now and then (a 503, a reset connection, a timeout): every call here that
touches storage retries such a transient error with exponential backoff (`RETRY`), and a read stream that
fails mid-file reopens the file at the byte it had reached (`ResumingReader`). A permanent error (a missing
file, a refused permission, a full disk) is not retried; an error that outlasts the retries is one line
naming the URL. Checkpoint files, shard reads and certification outputs all go through here.

This module sits at the bottom of the import graph (beside `config`): it imports fsspec and nothing of
ours, so the model, the optimizer, checkpoints, data, training and certification can all use it.
Each caller passes its own error class, so a bad URL surfaces as that component's error with its fix.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import fsspec

from lipnext_scale.errors import LipnextError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient storage error is retried: attempt k (k >= 1) waits
    first_delay_s * 2**(k-1), capped at max_delay_s, times a random factor in [0.5, 1] (jitter, so ranks
    that failed together do not retry together). The defaults wait 24-48 s in all before giving up."""

    attempts: int = 8
    first_delay_s: float = 0.5
    max_delay_s: float = 16.0

    def delay(self, attempt: int) -> float:
        return min(self.first_delay_s * 2 ** (attempt - 1), self.max_delay_s) * random.uniform(0.5, 1.0)


RETRY = RetryPolicy()
# Not worth retrying: the same request would fail the same way (the file is missing, access is refused, the
# disk or quota is full, the path is wrong).
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM,
                     errno.ENOENT, errno.EINVAL, errno.EEXIST, errno.EISDIR, errno.ENOTDIR}


def is_transient(e: BaseException) -> bool:
    """A storage error the same request may not meet again: a network/service error, not a missing file,
    a refused permission or a full disk."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return isinstance(e, OSError) and not isinstance(e, _PERMANENT) and e.errno not in _PERMANENT_ERRNOS


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def with_retries(url: str, what: str, call: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """`call()`, retried on transient errors (logged) with backoff; the last error, or a permanent one, is
    re-raised as it came (the caller turns it into its own one-line error)."""
    policy = policy or RETRY
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Exception as e:
            if attempt == policy.attempts or not is_transient(e):
                if attempt > 1:
                    e.storage_attempts = attempt  # the caller's message says how long it tried
                raise
            pause = policy.delay(attempt)
            log.warning("%s %s failed (%s); retry %d of %d in %.1f s", what, url, _one_line(e), attempt,
                        policy.attempts - 1, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _failure(url: str, what: str, e: BaseException) -> str:
    """One line: what failed on which URL, after how many attempts, and what to do."""
    tries = getattr(e, "storage_attempts", 0)
    tried = f" after {tries} attempts" if tries else ""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "the disk or quota is full: free space (or prune old runs) and rerun; nothing complete was replaced"
    elif tries:
        fix = "the storage service keeps failing: check it and rerun"
    else:
        fix = "check the path and its permissions"
    return f"cannot {what} {url!r}{tried} ({_one_line(e)}); {fix}"


storage_failure = _failure  # for the few callers that need fsspec's own API under the same retries and wording


class StorageError(LipnextError, ValueError):
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
    """Whether `url` exists. Not fsspec's `exists`, which answers False to any error: a store that fails
    the request is retried, then an error, never taken for "not there"."""
    fs, path = url_to_fs(url, error)

    def probe() -> bool:
        try:
            fs.info(path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    try:
        return with_retries(url, "checking", probe)
    except OSError as e:
        raise error(_failure(url, "check", e)) from None


class ResumingReader:
    """A file opened for reading that survives a transient error mid-stream: it reopens the file and seeks
    back to the byte it had reached (with `with_retries`' backoff). Whatever changed the file meanwhile is
    for the caller's checksum to catch (shards are checked against their manifest's sha256)."""

    def __init__(self, fs, path: str, url: str, mode: str):
        self.fs, self.path, self.url, self.mode, self.pos = fs, path, url, mode, 0
        self.f = fs.open(path, mode)

    def _reopen(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()
        self.f = self.fs.open(self.path, self.mode)
        if self.pos:
            self.f.seek(self.pos)

    def read(self, n: int = -1) -> bytes:
        failed = False

        def attempt() -> bytes:
            nonlocal failed
            if failed:
                self._reopen()
            failed = True
            data = self.f.read(n)
            failed = False
            return data

        data = with_retries(self.url, "reading", attempt)
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self.f.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return self.f.seekable()

    def close(self) -> None:
        self.f.close()

    def __getattr__(self, name: str):
        return getattr(self.f, name)


@contextlib.contextmanager
def open_url(url: str, mode: str = "rb", error: type[Exception] = StorageError) -> Iterator:
    """The one opener: `with open_url(u) as f`. A missing file or an unreadable location raises `error`
    naming the URL (errors raised by the caller's own code inside the block pass through unchanged).
    Transient errors are retried, when opening and, for "rb", mid-stream (`ResumingReader`)."""
    fs, path = url_to_fs(url, error)
    try:
        if mode == "rb":
            f = with_retries(url, "opening", lambda: ResumingReader(fs, path, url, mode))
        else:
            f = with_retries(url, "opening", lambda: fs.open(path, mode))
    except FileNotFoundError:
        raise error(f"{url!r} does not exist") from None
    except OSError as e:
        raise error(_failure(url, "open", e)) from None
    try:
        yield f
    finally:
        f.close()


def read_bytes(url: str, error: type[Exception] = StorageError) -> bytes:
    with open_url(url, "rb", error) as f:
        return f.read()


def atomic_write_bytes(url: str, data: bytes, error: type[Exception] = StorageError) -> None:
    """Write `data` to `url` via a temporary sibling name and a rename; a failure leaves the old file (and
    no temporary one). Transient errors are retried, each attempt from the start under a new name."""
    fs, path = url_to_fs(url, error)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""

    def attempt() -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            if parent:
                fs.makedirs(parent, exist_ok=True)
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        except BaseException:
            _remove_quietly(fs, tmp)
            raise

    try:
        with_retries(url, "writing", attempt)
    except OSError as e:
        raise error(_failure(url, "write", e)) from None


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
    def remove() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    with contextlib.suppress(Exception):
        with_retries(path, "removing", remove)


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
