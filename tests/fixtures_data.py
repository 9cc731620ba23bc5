"""Tiny generated sources in every layout prep accepts, with the quirks of real ImageNet files, and a
shared local Ray instance. Each `make_*` returns the expected labelling: {split: {key: class id}}."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# Deliberately not in sorted order, and the devkit's ILSVRC2012_IDs follow this order: a reader that
# uses the ID order (or the folder listing order) instead of the sorted wnids gets the labels wrong.
WNIDS = ["n03000003", "n01000001", "n02000002"]
SORTED_WNIDS = sorted(WNIDS)
QUIRK_NAMES = ("cmyk", "gray", "png")


def jpeg_bytes(color, size=(40, 28), mode="RGB") -> bytes:
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(color, size=(28, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (*color, 255)).save(buf, format="PNG")
    return buf.getvalue()


def class_color(i: int) -> tuple[int, int, int]:
    return ((70 * i + 40) % 256, (130 * i + 90) % 256, (200 * i + 10) % 256)


def imagenet_files(per_class: int = 3, quirks: bool = True) -> list[tuple[str, str, bytes]]:
    """(wnid, file name, bytes) of train images; the first class gets a CMYK JPEG, a grayscale JPEG and a
    PNG under a .JPEG name, the last one an undecodable file (prep skips it and says why)."""
    out = []
    for ci, wnid in enumerate(WNIDS):
        for j in range(per_class):
            name = f"{wnid}_{j}.JPEG"
            if quirks and ci == 0 and j < 3:
                kind = QUIRK_NAMES[j]
                data = (png_bytes(class_color(ci)) if kind == "png"
                        else jpeg_bytes(class_color(ci), mode={"cmyk": "CMYK", "gray": "L"}[kind]))
            else:
                data = jpeg_bytes(class_color(ci), size=(40 + j, 28))
            out.append((wnid, name, data))
    if quirks:
        out.append((WNIDS[-1], f"{WNIDS[-1]}_broken.JPEG", b"\xff\xd8\xff not really a jpeg"))
    return out


def val_files(per_class: int = 2) -> list[tuple[str, str, bytes]]:
    """(wnid, ILSVRC2012_val_XXXXXXXX.JPEG, bytes): classes interleaved so file order != class order."""
    n = per_class * len(WNIDS)
    return [(WNIDS[i % len(WNIDS)], f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(class_color(i % len(WNIDS))))
            for i in range(n)]


def _expected(train, val) -> dict[str, dict[str, str]]:
    exp = {"train": {name.split(".")[0]: w for w, name, data in train if not data.startswith(b"\xff\xd8\xff not")}}
    if val is not None:
        exp["val"] = {name.split(".")[0]: w for w, name, _ in val}
    return exp


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    _write(path, _tar_bytes(members))
    return path


def make_imagenet_folders(root: Path) -> dict:
    train, val = imagenet_files(), val_files()
    for w, name, data in train:
        _write(root / "train" / w / name, data)
    for w, name, data in val:
        _write(root / "val" / w / name, data)
    return _expected(train, val)


def make_imagenet_cls_loc(root: Path) -> dict:
    train, val = imagenet_files(), val_files()
    data_dir = root / "ILSVRC" / "Data" / "CLS-LOC"
    for w, name, data in train:
        _write(data_dir / "train" / w / name, data)
    rows = ["ImageId,PredictionString"]
    for w, name, data in val:
        _write(data_dir / "val" / name, data)
        rows.append(f"{name.split('.')[0]},{w} 1 2 30 20 {w} 3 4 10 10")
    _write(root / "LOC_val_solution.csv", ("\n".join(rows) + "\n").encode())
    _write(root / "LOC_synset_mapping.txt", "".join(f"{w} name of {w}\n" for w in SORTED_WNIDS).encode())
    return _expected(train, val)


def make_imagenet_archives(root: Path) -> dict:
    """ILSVRC2012_img_train.tar (tar of per-class tars), _val.tar and the devkit with meta.mat, whose
    ILSVRC2012_IDs follow WNIDS (not sorted) and include a non-leaf synset."""
    from scipy.io import savemat

    train, val = imagenet_files(), val_files()
    inner = [(f"{w}.tar", _tar_bytes([(name, data) for ww, name, data in train if ww == w])) for w in WNIDS]
    _write(root / "ILSVRC2012_img_train.tar", _tar_bytes(inner))
    _write(root / "ILSVRC2012_img_val.tar", _tar_bytes([(name, data) for _, name, data in val]))
    ids = {w: i + 1 for i, w in enumerate(WNIDS)}
    synsets = np.zeros((len(WNIDS) + 1,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                                 ("num_children", "O")])
    for i, w in enumerate(WNIDS):
        synsets[i] = (ids[w], w, f"words of {w}", 0)
    synsets[-1] = (len(WNIDS) + 1, "n00000009", "an ancestor synset", 2)
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    truth = "".join(f"{ids[w]}\n" for w, _, _ in val).encode()
    devkit = io.BytesIO()
    with tarfile.open(fileobj=devkit, mode="w:gz") as tar:
        for name, data in (("ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue()),
                           ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _write(root / "ILSVRC2012_devkit_t12.tar.gz", devkit.getvalue())
    return _expected(train, val)


def make_tiny_imagenet(root: Path) -> dict:
    base = root / "tiny-imagenet-200"
    train = [(w, f"{w}_{j}.JPEG", jpeg_bytes(class_color(i), size=(64, 64))) for i, w in enumerate(WNIDS)
             for j in range(2)]
    for w, name, data in train:
        _write(base / "train" / w / "images" / name, data)
    _write(base / "wnids.txt", "\n".join(WNIDS).encode())
    _write(base / "words.txt", "".join(f"{w}\tword {w}\n" for w in WNIDS).encode())
    ann = []
    for i in range(4):
        w = WNIDS[(i + 1) % len(WNIDS)]
        _write(base / "val" / "images" / f"val_{i}.JPEG", jpeg_bytes(class_color(WNIDS.index(w)), size=(64, 64)))
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t10\t10")
    _write(base / "val" / "val_annotations.txt", ("\n".join(ann) + "\n").encode())
    return {"train": {n.split(".")[0]: w for w, n, _ in train}, "val": {f"val_{i}": WNIDS[(i + 1) % 3] for i in range(4)}}


def cifar_arrays(n: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, num_classes, size=n)


def make_cifar(root: Path, kind: str, fmt: str, per_file: int = 4) -> tuple[Path, dict]:
    """A release archive (tar.gz) of `kind` in `fmt` ("python" or "binary") with `per_file` images per
    batch file. Returns (archive path, {split: [(pixels HWC uint8, label), ...]})."""
    ten = kind == "cifar10"
    files = (["data_batch_%d" % i for i in range(1, 6)] + ["test_batch"]) if ten else ["train", "test"]
    num_classes = 10 if ten else 100
    folder = {("cifar10", "python"): "cifar-10-batches-py", ("cifar10", "binary"): "cifar-10-batches-bin",
              ("cifar100", "python"): "cifar-100-python", ("cifar100", "binary"): "cifar-100-binary"}[(kind, fmt)]
    members, expected = [], {"train": [], "val": []}  # the official test batch is prepared as "val"
    names = [f"class{i}" for i in range(num_classes)]
    for k, fname in enumerate(files):
        data, labels = cifar_arrays(per_file, num_classes, seed=k)
        split = "val" if "test" in fname else "train"
        expected[split] += [(data[i].reshape(3, 32, 32).transpose(1, 2, 0), int(labels[i])) for i in range(per_file)]
        if fmt == "python":
            key = b"labels" if ten else b"fine_labels"
            batch = {b"data": data, key: [int(x) for x in labels], b"batch_label": fname.encode()}
            members.append((f"{folder}/{fname}", pickle.dumps(batch, protocol=2)))
        else:
            head = labels.astype(np.uint8)[:, None] if ten else np.stack([labels // 5, labels], 1).astype(np.uint8)
            members.append((f"{folder}/{fname}.bin", np.concatenate([head, data], 1).tobytes()))
    if fmt == "python":
        meta_name, key = ("batches.meta", b"label_names") if ten else ("meta", b"fine_label_names")
        members.append((f"{folder}/{meta_name}", pickle.dumps({key: [n.encode() for n in names]}, protocol=2)))
    else:
        members.append((f"{folder}/{'batches.meta.txt' if ten else 'fine_label_names.txt'}", "\n".join(names).encode()))
    archive = root / f"{folder}.tar.gz"
    _write(archive, _tar_bytes(members, mode="w:gz"))
    return archive, expected


def prepared_digits(out: Path, split: str = "val", shard_size: int = 100) -> list[Path]:
    """Real digits shards + a complete manifest + classes.json under `out`, written as `prepare` writes them
    but in this process (no Ray): for tests of reading that need prepared data, fast."""
    from lipnext_scale.data.manifest import manifest_url, shard_name, write_classes, write_manifest
    from lipnext_scale.data.prep import SETTINGS_KEYS, build_shard, plan_digest
    from lipnext_scale.data.sources import list_source

    plan = list_source("digits", None, [split])
    settings = {"kind": "digits", "image_size": 32, "quality": 95, "shard_size": shard_size, "image_format": "png",
                "num_classes": 10, "classes": plan.classes}
    samples = plan.splits[split]
    rows, paths = [], []
    for i in range(0, len(samples), shard_size):
        chunk, index = samples[i:i + shard_size], i // shard_size
        data, stats = build_shard(chunk, settings)
        stats.pop("skipped")
        path = out / shard_name(split, index)
        _write(path, data)
        paths.append(path)
        rows.append({"split": split, "index": index, "shard": path.name,
                     "plan_digest": plan_digest(split, index, settings, chunk), **stats})
    meta = {**{k: settings[k] for k in SETTINGS_KEYS}, "split": split, "num_shards": len(rows), "complete": True}
    write_manifest(manifest_url(str(out), split), rows, meta)
    write_classes(str(out), {"kind": "digits", "num_classes": 10, "classes": plan.classes, "names": plan.classes})
    return paths


def flip_label_same_size(shard: Path, key: str) -> None:
    """Change the label digit of sample `key` in place: the shard keeps its size and stays a valid tar
    (tar checksums cover headers only), so only a content hash can tell."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{key}.cls")
    raw = bytearray(shard.read_bytes())
    old = raw[member.offset_data]
    raw[member.offset_data] = ord("0") + (old - ord("0") + 1) % 10
    shard.write_bytes(bytes(raw))
