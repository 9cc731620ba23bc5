"""Tiny-ImageNet (`tiny-imagenet-200/`): train/<wnid>/images/*.JPEG, val/images + val_annotations.txt.

Labels are the index of the wnid in the sorted training wnids (the same convention as ImageNet).
The unlabeled test split is not prepared.
"""

from __future__ import annotations

from lipnext_scale.data.errors import DataError
from lipnext_scale.data.sources.base import FileRef, SourcePlan, SourceSample, safe_key
from lipnext_scale.data.sources.imagefiles import list_images, read_text, subdirs
from lipnext_scale.storage import exists, is_dir, join_url


def list_tiny_imagenet(source: str | None) -> SourcePlan:
    if not source:
        raise DataError("tiny-imagenet needs --source: the extracted tiny-imagenet-200 folder")
    root = join_url(source, "tiny-imagenet-200") if is_dir(join_url(source, "tiny-imagenet-200"), DataError) else source
    if not is_dir(join_url(root, "train"), DataError):
        raise DataError(f"{source!r} is not a tiny-imagenet-200 folder: no train/ directory in it")
    skipped: list[tuple[str, str]] = []
    wnids, dangling = subdirs(join_url(root, "train"), skipped)
    index = {w: i for i, w in enumerate(wnids)}
    train = [SourceSample(safe_key(name.rsplit(".", 1)[0]), index[w], f"train/{w}/images/{name}", FileRef(url))
             for w in wnids if w not in dangling
             for name, url in list_images(join_url(root, "train", w, "images"), skipped)]
    splits = {"train": train}
    ann_url = join_url(root, "val", "val_annotations.txt")
    if exists(ann_url, DataError):
        val = []
        for n, line in enumerate(read_text(ann_url).splitlines()):
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            name, wnid = parts[0], parts[1]
            if wnid not in index:
                raise DataError(f"{ann_url} line {n + 1}: wnid {wnid!r} has no train/{wnid}/ folder")
            val.append(SourceSample(safe_key(name.rsplit(".", 1)[0]), index[wnid], f"val/images/{name}",
                                    FileRef(join_url(root, "val", "images", name))))
        splits["val"] = sorted(val, key=lambda s: s.key)
    words_url = join_url(root, "words.txt")
    names = None
    if exists(words_url, DataError):
        words = dict(ln.split("\t", 1) for ln in read_text(words_url).splitlines() if "\t" in ln)
        names = [words.get(w, w).strip() for w in wnids]
    return SourcePlan(kind="tiny-imagenet", classes=wnids, names=names, splits=splits, image_format="jpg",
                      default_image_size=64, skipped=skipped)
