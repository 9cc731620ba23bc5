"""`faulty://`: the local file system behind an fsspec protocol that injects the faults an object store or a
full disk produces, for tests of real components (storage.py and everything above it) under those faults.

    FAULTS.share = 0.25          # a quarter of the calls (open, read, write, ls, info, mv, rm), drawn from a
                                 # seeded generator, raise ConnectionError (a flaky object store)
    FAULTS.fail_paths = {"/x"}   # every call on a path under /x raises ConnectionError (a permanent outage)
    FAULTS.space = 1000          # writes beyond 1000 more bytes raise OSError(ENOSPC)
    FAULTS.on_read = fn          # fn(path) before each read of a file (e.g. rewrite it in place mid-read)

`FAULTS.reset()` between tests. The faults are process-wide (class attributes): fsspec caches instances.
"""

from __future__ import annotations

import errno
import random
import threading

import fsspec
from fsspec.implementations.local import LocalFileSystem


class Faults:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.share, self.fail_paths, self.space, self.on_read = 0.0, set(), None, None
        self.calls = self.failed = 0
        self.rng = random.Random(0)
        self.lock = threading.Lock()

    def call(self, what: str, path: str) -> None:
        with self.lock:
            self.calls += 1
            if any(str(path).startswith(p) for p in self.fail_paths) or (
                    self.share and self.rng.random() < self.share):
                self.failed += 1
                raise ConnectionError(f"injected: 503 Slow Down ({what} {path})")

    def write(self, n: int) -> None:
        with self.lock:
            if self.space is not None:
                if n > self.space:
                    self.space = 0
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")
                self.space -= n


FAULTS = Faults()


class _FaultyFile:
    def __init__(self, f, path: str):
        self._f, self._path = f, path

    def read(self, n: int = -1) -> bytes:
        if FAULTS.on_read is not None:
            FAULTS.on_read(self._path)
        FAULTS.call("read", self._path)
        return self._f.read(n)

    def write(self, data) -> int:
        FAULTS.call("write", self._path)
        FAULTS.write(len(data))
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class FaultyFileSystem(LocalFileSystem):
    protocol = ("faulty",)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("faulty://"):
            path = path[len("faulty://"):]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"faulty://{self._strip_protocol(name)}"

    def _open(self, path, mode="rb", **kwargs):
        FAULTS.call("open", path)
        return _FaultyFile(super()._open(path, mode, **kwargs), self._strip_protocol(path))

    def ls(self, path, detail=False, **kwargs):
        FAULTS.call("ls", path)
        out = super().ls(path, detail=detail, **kwargs)
        return out

    def info(self, path, **kwargs):
        FAULTS.call("info", path)
        return super().info(path, **kwargs)

    def mv(self, path1, path2, **kwargs):
        FAULTS.call("mv", path1)
        return super().mv(path1, path2, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):
        FAULTS.call("rm", path)
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
