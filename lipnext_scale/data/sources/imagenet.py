"""ImageNet-1k in the three layouts people have; labels = index of the wnid in the sorted training wnids.

(a) folders   SRC/train/<wnid>/*.JPEG, SRC/val/<wnid>/*.JPEG
(b) archives  SRC/ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar,
              ILSVRC2012_devkit_t12.tar.gz: val labels are ILSVRC2012_IDs (data/ILSVRC2012_validation_
              ground_truth.txt, one per val image in file order), mapped to wnids by data/meta.mat,
              whose ID order is NOT the sorted-wnid order. Members are read by offset: nothing is unpacked.
(c) CLS-LOC   SRC/ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}, SRC/LOC_val_solution.csv,
              SRC/LOC_synset_mapping.txt
"""

from __future__ import annotations

import io
import tarfile

from lipnext_scale.data.errors import DataError
from lipnext_scale.data.sources.base import FileRef, SourcePlan, SourceSample, TarMemberRef, safe_key
from lipnext_scale.data.sources.imagefiles import IMAGE_EXTENSIONS, list_images, read_text, subdirs
from lipnext_scale.storage import file_size, is_dir, is_file, join_url, open_url

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
CLS_LOC = "ILSVRC/Data/CLS-LOC"


def _isdir(url: str) -> bool:
    return is_dir(url, DataError)


def _isfile(url: str) -> bool:
    return is_file(url, DataError)


def list_imagenet(source: str | None) -> SourcePlan:
    if not source:
        raise DataError("imagenet needs --source: a folder with train/ and val/, the ILSVRC2012 archives, "
                        "or the Kaggle CLS-LOC layout")
    if not _isdir(source):
        raise DataError(f"ImageNet source {source!r} is not a directory")
    if _isfile(join_url(source, TRAIN_TAR)) or _isfile(join_url(source, VAL_TAR)):
        return _from_archives(source)
    if _isdir(join_url(source, CLS_LOC)):
        return _from_cls_loc(source)
    if _isdir(join_url(source, "train")):
        return _from_folders(source)
    raise DataError(f"{source!r} holds no ImageNet layout I know: expected train/<wnid>/ folders, "
                    f"{TRAIN_TAR} + {VAL_TAR} + {DEVKIT}, or {CLS_LOC}/ with LOC_val_solution.csv")


def _plan(wnids: list[str], splits: dict, names: list[str] | None = None,
          skipped: list[tuple[str, str]] | None = None) -> SourcePlan:
    return SourcePlan(kind="imagenet", classes=wnids, names=names, splits=splits, image_format="jpg",
                      default_image_size=256, skipped=skipped or [])


def _class_folders(root: str, wnids: list[str], dangling: set[str], index: dict[str, int], split: str,
                   skipped: list[tuple[str, str]]) -> list[SourceSample]:
    return [SourceSample(safe_key(name.rsplit(".", 1)[0]), index[w], f"{split}/{w}/{name}", FileRef(url))
            for w in wnids if w not in dangling for name, url in list_images(join_url(root, w), skipped)]


def _from_folders(source: str) -> SourcePlan:
    skipped: list[tuple[str, str]] = []
    wnids, dangling = subdirs(join_url(source, "train"), skipped)
    index = {w: i for i, w in enumerate(wnids)}
    splits = {"train": _class_folders(join_url(source, "train"), wnids, dangling, index, "train", skipped)}
    if _isdir(join_url(source, "val")):
        val_wnids, val_dangling = subdirs(join_url(source, "val"), skipped)
        unknown = sorted(set(val_wnids) - set(index))
        if unknown:
            raise DataError(f"{source}/val has class folders {unknown[:3]} that are not in train/")
        splits["val"] = _class_folders(join_url(source, "val"), val_wnids, val_dangling, index, "val", skipped)
    return _plan(wnids, splits, skipped=skipped)


def _from_cls_loc(source: str) -> SourcePlan:
    data = join_url(source, CLS_LOC)
    skipped: list[tuple[str, str]] = []
    wnids, dangling = subdirs(join_url(data, "train"), skipped)
    index = {w: i for i, w in enumerate(wnids)}
    splits = {"train": _class_folders(join_url(data, "train"), wnids, dangling, index, "train", skipped)}
    names = None
    mapping_url = join_url(source, "LOC_synset_mapping.txt")
    if _isfile(mapping_url):
        mapping = dict(ln.split(" ", 1) for ln in read_text(mapping_url).splitlines() if " " in ln)
        names = [mapping.get(w, w).strip() for w in wnids]
    solution_url = join_url(source, "LOC_val_solution.csv")
    if _isdir(join_url(data, "val")):
        if not _isfile(solution_url):
            raise DataError(f"{data}/val exists but {solution_url} does not: it holds the val labels")
        labels = {}
        for n, line in enumerate(read_text(solution_url).splitlines()[1:]):  # header: ImageId,PredictionString
            if not line.strip():
                continue
            image_id, prediction = line.split(",", 1)
            wnid = prediction.split()[0] if prediction.split() else ""
            if wnid not in index:
                raise DataError(f"{solution_url} line {n + 2}: wnid {wnid!r} is not a train/ class")
            labels[image_id.strip()] = index[wnid]
        val = []
        for name, url in list_images(join_url(data, "val"), skipped):
            stem = name.rsplit(".", 1)[0]
            if stem not in labels:
                raise DataError(f"{url}: no row for {stem!r} in {solution_url}")
            val.append(SourceSample(safe_key(stem), labels[stem], f"val/{name}", FileRef(url)))
        splits["val"] = val
    return _plan(wnids, splits, names, skipped)


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of a file (a tar inside a tar)."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data


def _tar_members(f, start: int, size: int) -> list[tuple[str, int, int]]:
    """(name, absolute data offset, size) of the regular files of the tar at [start, start + size)."""
    with tarfile.open(fileobj=_Window(f, start, size), mode="r:") as tar:
        return [(m.name, start + m.offset_data, m.size) for m in tar if m.isfile()]


def _from_archives(source: str) -> SourcePlan:
    train_url = join_url(source, TRAIN_TAR)
    if not _isfile(train_url):
        raise DataError(f"{train_url} is missing: the class list (sorted wnids) comes from the training archive")
    by_wnid: dict[str, list[tuple[str, int, int]]] = {}
    with open_url(train_url, "rb", DataError) as f:
        for name, offset, size in _tar_members(f, 0, file_size(train_url, DataError)):
            wnid = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            if name.endswith(".tar"):
                by_wnid[wnid] = _tar_members(f, offset, size)
    wnids = sorted(by_wnid)
    index = {w: i for i, w in enumerate(wnids)}
    train = [SourceSample(safe_key(name.rsplit("/", 1)[-1].rsplit(".", 1)[0]), index[w], f"{TRAIN_TAR}:{w}.tar:{name}",
                          TarMemberRef(train_url, offset, size))
             for w in wnids for name, offset, size in sorted(by_wnid[w])]
    splits = {"train": train}
    names = None
    val_url = join_url(source, VAL_TAR)
    devkit_url = join_url(source, DEVKIT)
    if _isfile(val_url):
        if not _isfile(devkit_url):
            raise DataError(f"{val_url} needs {devkit_url} for its labels (meta.mat + validation ground truth)")
        id_to_wnid, ground_truth, words = _read_devkit(devkit_url)
        with open_url(val_url, "rb", DataError) as f:
            members = sorted(m for m in _tar_members(f, 0, file_size(val_url, DataError))
                             if m[0].lower().endswith(IMAGE_EXTENSIONS))
        if len(members) != len(ground_truth):
            raise DataError(f"{val_url} has {len(members)} images but the devkit lists {len(ground_truth)} labels")
        val = []
        for (name, offset, size), ilsvrc_id in zip(members, ground_truth):
            wnid = id_to_wnid.get(ilsvrc_id)
            if wnid not in index:
                raise DataError(f"{DEVKIT}: val image {name} has ILSVRC2012_ID {ilsvrc_id} -> {wnid!r}, not a train class")
            val.append(SourceSample(safe_key(name.rsplit("/", 1)[-1].rsplit(".", 1)[0]), index[wnid],
                                    f"{VAL_TAR}:{name}", TarMemberRef(val_url, offset, size)))
        splits["val"] = val
        names = [words.get(w, w) for w in wnids]
    return _plan(wnids, splits, names)


def _read_devkit(url: str) -> tuple[dict[int, str], list[int], dict[str, str]]:
    """(ILSVRC2012_ID -> wnid, val ground-truth IDs in file order, wnid -> words) from the devkit tar.gz."""
    from scipy.io import loadmat  # MAT-file v5 parser: no pickle involved

    meta = truth = None
    with open_url(url, "rb", DataError) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for m in tar:
            if m.name.endswith("data/meta.mat"):
                meta = tar.extractfile(m).read()
            elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                truth = tar.extractfile(m).read().decode()
    if meta is None or truth is None:
        raise DataError(f"{url} lacks data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt")
    synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    id_to_wnid, words = {}, {}
    for s in synsets.ravel():
        if int(s["num_children"]) == 0:  # the 1000 leaf classes; the rest are WordNet ancestors
            id_to_wnid[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
            words[str(s["WNID"])] = str(s["words"])
    return id_to_wnid, [int(x) for x in truth.split()], words
