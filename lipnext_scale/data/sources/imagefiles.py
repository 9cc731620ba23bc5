"""Listing helpers for folder layouts on any fsspec URL."""

from __future__ import annotations

from lipnext_scale.data.urls import DataError, url_to_fs

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def subdirs(url: str) -> list[str]:
    fs, path = url_to_fs(url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError as e:
        raise DataError(f"{url!r} does not exist") from e
    names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
    if not names:
        raise DataError(f"{url!r} has no class sub-folders (expected <wnid>/ folders)")
    return names


def list_images(url: str) -> list[tuple[str, str]]:
    """Sorted (file name, URL) of the image files directly in `url` (by extension, any case)."""
    fs, path = url_to_fs(url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError as e:
        raise DataError(f"{url!r} does not exist") from e
    out = []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e["type"] == "file" and name.lower().endswith(IMAGE_EXTENSIONS):
            out.append((name, f"{url.rstrip('/')}/{name}"))
    return sorted(out)


def read_text(url: str) -> str:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")
