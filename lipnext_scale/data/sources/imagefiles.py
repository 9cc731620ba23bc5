"""Listing helpers for folder layouts on any fsspec URL.

Symlinks are followed (a class folder or an image linked in from elsewhere is as good as a real one). A
dangling symlink is logged and recorded in `skipped`, never dropped silently: among image files it is
skipped; among class folders its class is kept, with no images, because dropping it would shift the
label of every later class.
"""

from __future__ import annotations

import logging

from lipnext_scale.data.errors import DataError
from lipnext_scale.storage import list_dir, read_bytes

log = logging.getLogger("lipnext_scale.data")

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _entries(url: str, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(name, "file" | "directory" | "dangling" | other type) of the entries directly in `url`, symlinks
    followed; dangling symlinks are logged and recorded in `skipped`."""
    out = []
    for e in list_dir(url, DataError):  # raises "does not exist or is not a directory"
        if e.type == "dangling":
            origin = f"{url.rstrip('/')}/{e.name}"
            skipped.append((origin, "dangling symlink"))
            log.warning("%s is a dangling symlink: skipped", origin)
        out.append((e.name, e.type))
    return out


def subdirs(url: str, skipped: list[tuple[str, str]]) -> tuple[list[str], set[str]]:
    """(sorted class folder names, the ones that are dangling symlinks): a dangling one keeps its place in
    the class list (no label shifts) and has no images."""
    entries = [(n, k) for n, k in _entries(url, skipped) if k in ("directory", "dangling")]
    names = sorted(n for n, _ in entries)
    dangling = {n for n, k in entries if k == "dangling"}
    if not names or len(dangling) == len(names):
        raise DataError(f"{url!r} has no class sub-folders (expected <wnid>/ folders)")
    return names, dangling


def list_images(url: str, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Sorted (file name, URL) of the image files directly in `url` (by extension, any case)."""
    return sorted((name, f"{url.rstrip('/')}/{name}") for name, kind in _entries(url, skipped)
                  if kind == "file" and name.lower().endswith(IMAGE_EXTENSIONS))


def read_text(url: str) -> str:
    return read_bytes(url, DataError).decode("utf-8", errors="replace")
