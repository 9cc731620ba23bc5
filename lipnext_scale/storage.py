"""Every byte the library reads or writes goes through here: fsspec URLs, one opener, one atomic writer.

The helpers the rest of the code uses instead of fsspec, `open`, `os`, `shutil` or pathlib (a test,
tests/unit/test_io_home.py, enforces it): `open_url`, `read_bytes`, `atomic_write_bytes`, `atomic_write_files`
(a directory in one step), `read_json` / `write_json` / `parse_json`, `exists`, `is_dir`, `is_file`, `file_size`,
`list_dir`, `glob`, `find_files`, `makedirs`, `move`, `remove`, and checksums (`digest`, `file_digest`,
`HashingReader`, `verify_digest`). Local paths are just the `file://` case.

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
import hashlib
import json
import logging
import posixpath
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

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


def check_url(url: str, error: type[Exception] = StorageError) -> None:
    """Raise `error` now for a URL no filesystem can open (empty, unknown protocol, missing backend), so a
    job refuses it before doing any work."""
    url_to_fs(url, error)


def file_in_the_way(url: str, error: type[Exception] = StorageError) -> str | None:
    """What stops a directory from being made at `url`: `url` itself when it is a file, the path of the
    nearest existing parent when that one is a file; None when nothing is in the way."""
    fs, path = url_to_fs(url, error)
    existing = path.rstrip("/")
    while existing and not fs.exists(existing):  # the nearest part of the path that exists
        parent = posixpath.dirname(existing)
        existing = parent if parent != existing else ""
    if not existing or fs.isdir(existing):
        return None
    return url if existing == path.rstrip("/") else existing


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


def read_bytes(url: str, error: type[Exception] = StorageError, *, missing_ok: bool = False) -> bytes | None:
    """The whole file (retried, resumed mid-stream). A missing file raises `error` naming the URL, or with
    `missing_ok` returns None; a read that fails for good raises `error` saying after how many attempts."""
    fs, path = url_to_fs(url, error)
    try:
        f = with_retries(url, "opening", lambda: ResumingReader(fs, path, url, "rb"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{url!r} does not exist") from None
    except OSError as e:
        raise error(_failure(url, "open", e)) from None
    try:
        return f.read()
    except OSError as e:
        raise error(_failure(url, "read", e)) from None
    finally:
        f.close()


def parse_json(data: bytes, where: str, fix: str, error: type[Exception] = StorageError) -> Any:
    """The one JSON parser of stored bytes: anything unparsable (not UTF-8, zero-filled, cut short) raises
    `error`: "{where} is not valid JSON (...); {fix}"."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{where} is not valid JSON ({_one_line(e)}); {fix}") from None


def read_json(url: str, fix: str, error: type[Exception] = StorageError, *, missing_ok: bool = False) -> Any:
    """The one JSON reader: the parsed file at `url` (None for a missing file with `missing_ok`). A file that
    is not JSON raises `error` naming the URL and `fix`; so does one that cannot be read."""
    data = read_bytes(url, error, missing_ok=missing_ok)
    return None if data is None else parse_json(data, repr(url), fix, error)


def json_bytes(value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> bytes:
    """How a JSON file is spelled on storage (UTF-8), for files that are also hashed before writing."""
    return json.dumps(value, indent=indent, sort_keys=sort_keys).encode()


def write_json(url: str, value: Any, error: type[Exception] = StorageError, *, indent: int | None = 2,
               sort_keys: bool = False) -> None:
    """The one JSON writer: `value` written atomically (`atomic_write_bytes`)."""
    atomic_write_bytes(url, json_bytes(value, indent=indent, sort_keys=sort_keys), error)


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


def atomic_write_files(url: str, files: dict[str, bytes], *, replace: bool = False,
                       error: type[Exception] = StorageError) -> None:
    """A directory of `files` (name -> bytes) at `url`, written in one step (`atomic_write_tree`)."""

    def write(fs, tmp: str) -> None:
        for name, data in files.items():
            with fs.open(f"{tmp}/{name}", "wb") as f:
                f.write(data)

    atomic_write_tree(url, write, replace=replace, error=error)


# --------------------------------------------------------------------------------------------------
# Listing, moving, removing. Each is retried on transient errors; a permanent one raises `error` naming
# the URL (fsspec's own isdir/isfile/exists answer False to any error: a flaky store is never taken for
# "not there" here).


@dataclass(frozen=True)
class Entry:
    """One entry directly under a directory URL. type: "file", "directory", "dangling" (a symlink whose
    target is gone) or what the filesystem says; symlinks are followed."""

    name: str
    url: str
    type: str
    size: int | None


def list_dir(url: str, error: type[Exception] = StorageError, *, missing_ok: bool = False) -> list[Entry]:
    """The entries directly under `url`, in the filesystem's order. A missing directory raises `error`
    ("does not exist or is not a directory"), or with `missing_ok` gives []."""
    fs, path = url_to_fs(url, error)
    try:
        listed = with_retries(url, "listing", lambda: fs.ls(path, detail=True))
    except (FileNotFoundError, NotADirectoryError):
        if missing_ok:
            return []
        raise error(f"{url!r} does not exist or is not a directory") from None
    except OSError as e:
        raise error(_failure(url, "list", e)) from None
    out = []
    for e in listed:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        kind = e.get("type")
        if e.get("islink"):  # the local filesystem lists a symlink as "other": look at its target
            try:
                kind = fs.info(e["name"])["type"]
            except OSError:
                kind = "dangling"
        out.append(Entry(name, join_url(url, name), kind, e.get("size")))
    return out


def _retried(url: str, doing: str, verb: str, error: type[Exception], call: Callable[[], T]) -> T:
    """`call()` with the storage retries; an OSError left after them is `error`'s one line (`_failure`)."""
    try:
        return with_retries(url, doing, call)
    except OSError as e:
        raise error(_failure(url, verb, e)) from None


def glob(pattern: str, error: type[Exception] = StorageError) -> list[str]:
    """Sorted URLs (with their protocol) of what matches a glob pattern URL."""
    fs, path = url_to_fs(pattern, error)
    found = _retried(pattern, "listing", "list", error, lambda: fs.glob(path))
    return [fs.unstrip_protocol(p) for p in sorted(found)]


def find_files(url: str, error: type[Exception] = StorageError) -> list[str]:
    """URLs of every file under the directory `url`, at any depth (`url` joined with each relative path)."""
    fs, path = url_to_fs(url, error)
    found = _retried(url, "listing", "list", error, lambda: fs.find(path))
    root = path.rstrip("/")
    return [join_url(url, p[len(root):].lstrip("/")) if p.startswith(root + "/") else fs.unstrip_protocol(p)
            for p in found]


def _info(url: str, error: type[Exception]) -> dict | None:
    fs, path = url_to_fs(url, error)

    def probe() -> dict | None:
        try:
            return fs.info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    try:
        return with_retries(url, "checking", probe)
    except OSError as e:
        raise error(_failure(url, "check", e)) from None


def is_dir(url: str, error: type[Exception] = StorageError) -> bool:
    info = _info(url, error)
    return info is not None and info.get("type") == "directory"


def is_file(url: str, error: type[Exception] = StorageError) -> bool:
    info = _info(url, error)
    return info is not None and info.get("type") == "file"


def file_size(url: str, error: type[Exception] = StorageError) -> int:
    """Size in bytes of the file at `url`; a missing one raises `error`."""
    info = _info(url, error)
    if info is None:
        raise error(f"{url!r} does not exist")
    return int(info["size"])


def local_path(url: str, error: type[Exception] = StorageError) -> str | None:
    """The local-disk path of `url`, None when it lives elsewhere (an object store, memory://): for
    libraries that write files themselves (TensorBoard's event writer)."""
    fs, path = url_to_fs(url, error)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return path if ("file" in protocols or "local" in protocols) else None


def du(url: str, error: type[Exception] = StorageError) -> int:
    """Total bytes of the files under `url` (of the file, for a file)."""
    fs, path = url_to_fs(url, error)
    return int(_retried(url, "sizing", "size", error, lambda: fs.du(path, total=True)))


def makedirs(url: str, error: type[Exception] = StorageError) -> None:
    """Create the directory `url` and its parents (nothing when it exists; object stores have none)."""
    fs, path = url_to_fs(url, error)
    _retried(url, "creating", "create", error, lambda: fs.makedirs(path, exist_ok=True))


def move(src: str, dst: str, error: type[Exception] = StorageError) -> None:
    """Move a file or a whole directory to `dst` on the same filesystem (a rename where it has one)."""
    fs, src_path = url_to_fs(src, error)
    _, dst_path = url_to_fs(dst, error)
    try:
        with_retries(src, "moving", lambda: fs.mv(src_path, dst_path, recursive=True))
    except FileNotFoundError:
        raise error(f"{src!r} does not exist (moving it to {dst!r})") from None
    except OSError as e:
        raise error(_failure(src, "move", e)) from None


def remove(url: str, error: type[Exception] = StorageError, *, recursive: bool = False,
           missing_ok: bool = False) -> None:
    """Delete the file (or with `recursive`, the directory tree) at `url`. A missing one raises `error`,
    or with `missing_ok` is nothing to do (another remover got there first)."""
    fs, path = url_to_fs(url, error)
    try:
        with_retries(url, "removing", lambda: fs.rm(path, recursive=recursive))
    except FileNotFoundError:
        if not missing_ok:
            raise error(f"{url!r} does not exist") from None
    except OSError as e:
        raise error(_failure(url, "remove", e)) from None


# --------------------------------------------------------------------------------------------------
# Checksums: a file's size and sha256 (`Digest`), computed from bytes in hand, from a stream as it is read
# (`HashingReader`: a shard is checked while the tar reader streams it, no second read) or from a URL
# (`file_digest`), and one comparison (`verify_digest`) whose mismatch each caller words with its fix.


@dataclass(frozen=True)
class Digest:
    """What a manifest says a file is: its size and sha256 (hex)."""

    bytes: int
    sha256: str


def digest(data: bytes) -> Digest:
    return Digest(len(data), hashlib.sha256(data).hexdigest())


class HashingReader:
    """A read-only stream that hashes every byte read through it. It reports itself unseekable: a reader
    that skips data then reads it in bounded chunks (it must be hashed too), never holds it whole."""

    CHUNK = 1 << 20

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def seekable(self) -> bool:
        return False

    def finish(self) -> Digest:
        """Hash what is left unread and return the digest of the whole stream."""
        while self.read(self.CHUNK):
            pass
        return Digest(self.size, self.hash.hexdigest())


def file_digest(url: str, error: type[Exception] = StorageError) -> Digest:
    """Size and sha256 of a whole file, read in bounded chunks (with the opener's retries)."""
    with open_url(url, "rb", error) as f:
        try:
            return HashingReader(f).finish()
        except OSError as e:
            raise error(_failure(url, "read", e)) from None


def verify_digest(got: Digest, expected: Digest, mismatch: Callable[[str], Exception]) -> None:
    """The one checksum check: when `got` is not `expected`, raise `mismatch(what differs)`, the caller's
    one-line error ("12 bytes, sha256 0a1b2c3d4e5f6a7b... where the manifest has 10 bytes, ...")."""
    if got != expected:
        raise mismatch(f"{got.bytes} bytes, sha256 {got.sha256[:16]}... where the manifest has "
                       f"{expected.bytes} bytes, {str(expected.sha256)[:16]}...")


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
