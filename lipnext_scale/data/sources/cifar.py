"""CIFAR-10/100 from the official python or binary release (archive or extracted folder), read in memory.

The python release is pickled; it is read by an unpickler that resolves only the numpy array
reconstructors (and `_codecs.encode`, used by protocol-2 pickles of bytes): any other global (os.system,
builtins.eval, ...) aborts the read. The binary release needs no unpickling at all.
"""

from __future__ import annotations

import importlib
import io
import pickle
import tarfile

import numpy as np

from lipnext_scale.data.errors import DataError
from lipnext_scale.data.sources.base import PixelsRef, SourcePlan, SourceSample
from lipnext_scale.storage import exists, find_files, is_dir, open_url, read_bytes

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}

# (train files, test files, meta file, names key) per kind and format; binary records: label byte(s) + 3072.
_LAYOUT = {
    ("cifar10", "python"): (["data_batch_%d" % i for i in range(1, 6)], ["test_batch"], "batches.meta", b"label_names"),
    ("cifar100", "python"): (["train"], ["test"], "meta", b"fine_label_names"),
    ("cifar10", "binary"): (["data_batch_%d.bin" % i for i in range(1, 6)], ["test_batch.bin"], "batches.meta.txt", None),
    ("cifar100", "binary"): (["train.bin"], ["test.bin"], "fine_label_names.txt", None),
}


class ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(f"refusing to unpickle global {module}.{name}: a CIFAR batch holds only arrays, "
                            "lists and strings; this file is not the official release (use the binary release)")
        if module.startswith("numpy.core."):
            module = module.replace("numpy.core.", "numpy._core.", 1) if _has("numpy._core") else module
        return getattr(importlib.import_module(module), name)


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def load_array_pickle(data: bytes):
    return ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()


def _read_files(source: str) -> dict[str, bytes]:
    """basename -> bytes of every regular file in the archive (any compression) or folder tree."""
    if not exists(source, DataError):
        raise DataError(f"CIFAR source {source!r} does not exist; pass the release archive "
                        "(cifar-10-python.tar.gz, cifar-100-binary.tar.gz, ...) or its extracted folder")
    files: dict[str, bytes] = {}
    if is_dir(source, DataError):
        for url in find_files(source, DataError):
            files[url.rsplit("/", 1)[-1]] = read_bytes(url, DataError)
        return files
    with open_url(source, "rb", DataError) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for m in tar:
            if m.isfile():
                files[m.name.rsplit("/", 1)[-1]] = tar.extractfile(m).read()
    return files


def list_cifar(kind: str, source: str | None) -> SourcePlan:
    if not source:
        raise DataError(f"{kind} needs --source: the official release archive or its extracted folder")
    files = _read_files(source)
    fmt = next((f for f in ("python", "binary") if all(n in files for n in _LAYOUT[(kind, f)][0])), None)
    if fmt is None:
        expected = " or ".join(", ".join(_LAYOUT[(kind, f)][0]) for f in ("python", "binary"))
        raise DataError(f"{source!r} is not a {kind} release: expected files {expected}")
    train_files, test_files, meta_file, names_key = _LAYOUT[(kind, fmt)]
    num_classes = 10 if kind == "cifar10" else 100
    if meta_file in files:
        names = ([n.decode() for n in load_array_pickle(files[meta_file])[names_key]] if fmt == "python"
                 else [ln.strip() for ln in files[meta_file].decode().splitlines() if ln.strip()])
    else:
        names = [str(i) for i in range(num_classes)]
    splits = {}
    # The official test batch becomes split "val": every data set then has train/val, and recipes and
    # loaders name the evaluation split the same way everywhere.
    for split, names_of_files in (("train", train_files), ("val", test_files)):
        samples: list[SourceSample] = []
        for fname in names_of_files:
            pixels, labels = (_python_batch(files[fname], kind) if fmt == "python"
                              else _binary_batch(files[fname], kind, fname))
            for j in range(len(labels)):
                label = int(labels[j])
                if not 0 <= label < num_classes:
                    raise DataError(f"{fname}[{j}] has label {label}, outside 0..{num_classes - 1}")
                samples.append(SourceSample(key=f"{kind}_{split}_{len(samples):05d}", label=label,
                                            origin=f"{fname}[{j}]", ref=PixelsRef(32, 32, 3, pixels[j].tobytes())))
        splits[split] = samples
    return SourcePlan(kind=kind, classes=names, names=names, splits=splits, image_format="png",
                      default_image_size=32)


def _to_hwc(flat: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _python_batch(data: bytes, kind: str):
    batch = load_array_pickle(data)
    labels = batch[b"labels" if kind == "cifar10" else b"fine_labels"]
    return _to_hwc(np.asarray(batch[b"data"], dtype=np.uint8)), np.asarray(labels)


def _binary_batch(data: bytes, kind: str, fname: str):
    head = 1 if kind == "cifar10" else 2  # cifar100: coarse label byte, then fine label byte
    record = head + 3072
    if len(data) % record:
        raise DataError(f"{fname}: {len(data)} bytes is not a whole number of {record}-byte records")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return _to_hwc(rows[:, head:]), rows[:, head - 1]
