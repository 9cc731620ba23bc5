"""`{split}-manifest.parquet` and `classes.json`: what prep wrote, and what the loader and resume trust.

One manifest row per completed shard: `shard` is the file name relative to the manifest's directory
(so a prepared data set can be copied between buckets), `samples`, `bytes`, `sha256`, `class_counts`
(a list indexed by label) and `plan_digest` (a hash of the keys and prep settings the shard was
planned with: resume only skips a shard whose plan is unchanged). The schema metadata holds the
prep settings and `complete` (false while a prep is still running or was interrupted).

A shard is checked against its row (`ShardDigest`) while it streams: `storage.HashingReader` hashes the bytes
the tar reader reads anyway, so the check costs no second read. Prep's resume checks the same way.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lipnext_scale.data.errors import DataError
from lipnext_scale.storage import (
    Digest, atomic_write_bytes, exists, join_url, parent_url, read_bytes, read_json, write_json,
)
from lipnext_scale.storage import file_digest as storage_file_digest

_META_KEY = b"lipnext_scale.prep"

MANIFEST_SCHEMA = pa.schema([
    ("split", pa.string()),
    ("index", pa.int64()),
    ("shard", pa.string()),
    ("samples", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("class_counts", pa.list_(pa.int64())),
    ("plan_digest", pa.string()),
])


MANIFEST_SUFFIX = "-manifest.parquet"  # the one spelling of a split's manifest name: `{split}-manifest.parquet`
CLASSES_FILE = "classes.json"


def prefix_manifest_url(prefix: str) -> str:
    """The manifest of the split a prefix names: "s3://b/out/train" -> "s3://b/out/train-manifest.parquet"."""
    return f"{prefix.rstrip('/')}{MANIFEST_SUFFIX}"


def manifest_url(out_url: str, split: str) -> str:
    return prefix_manifest_url(join_url(out_url, split))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def split_of(shard_file: str) -> str | None:
    """"train" of "train-000003.tar" (the split a shard belongs to), None for a name prep did not write."""
    stem, sep, index = shard_file.removesuffix(".tar").rpartition("-")
    return stem if sep and stem and index.isdigit() else None


def write_manifest(url: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Atomically write the manifest at `url`: rows sorted by shard index, `meta` in the schema metadata."""
    rows = sorted(rows, key=lambda r: r["index"])
    columns = {name: [r[name] for r in rows] for name in MANIFEST_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(url, buf.getvalue(), DataError)


def read_manifest(url: str) -> pa.Table:
    """The manifest as a pyarrow Table (see `manifest_meta` and `manifest_rows`)."""
    data = read_bytes(url, DataError)
    try:
        # use_threads=False: a threaded read in a process that imported fsspec intermittently aborted at
        # interpreter exit ("terminate called without an active exception", exit 134); manifests are small.
        table = pq.read_table(io.BytesIO(data), use_threads=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"manifest {url!r} is not a readable parquet file ({e}); "
                        "re-run `lipnext prep` into that output URL to rebuild it") from e
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names]
    if missing:
        raise DataError(f"manifest {url!r} lacks column(s) {missing}; it was not written by `lipnext prep`")
    return table


def manifest_meta(table: pa.Table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(_META_KEY)
    return json.loads(raw) if raw else {}


def manifest_rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


def manifest_shard_urls(url: str, table: pa.Table) -> list[str]:
    base = parent_url(url)
    return [join_url(base, name) for name in table.column("shard").to_pylist()]


def write_classes(out_url: str, info: dict[str, Any]) -> None:
    write_json(join_url(out_url, CLASSES_FILE), info, DataError, indent=1)


def read_classes(out_url: str) -> dict[str, Any]:
    return read_json(join_url(out_url, CLASSES_FILE), "re-create the data set with `lipnext prep`", DataError)


def dataset_classes(shard_urls: list[str]) -> tuple[int | None, int | None, str]:
    """(declared class count, highest label present + 1, where it was read) of the data set the shards belong
    to: from the split's manifest next to them (per-shard class counts, written by `lipnext prep`), else from
    classes.json (no label counts there); (None, None, "") when neither exists (a hand-made shard set).
    Training and certification both check the model's classes against this."""
    folder = parent_url(shard_urls[0])
    split = split_of(shard_urls[0].rsplit("/", 1)[-1])
    manifest = manifest_url(folder, split) if split else None
    if manifest and exists(manifest, DataError):
        table = read_manifest(manifest)
        counts = [r["class_counts"] or [] for r in manifest_rows(table)]
        present = max((i + 1 for c in counts for i, n in enumerate(c) if n), default=None)
        declared = manifest_meta(table).get("num_classes") or max((len(c) for c in counts), default=None)
        return declared, present, manifest
    classes = join_url(folder, CLASSES_FILE)
    if exists(classes, DataError):
        info = read_classes(folder)
        if isinstance(info, list):
            return len(info) or None, None, classes
        if isinstance(info, dict) and ("num_classes" in info or "classes" in info):
            declared = int(info["num_classes"]) if "num_classes" in info else len(info["classes"])
            return declared or None, None, classes
        raise DataError(f"{classes!r} has neither `num_classes` nor `classes`; re-create the data set")
    return None, None, ""


ShardDigest = Digest  # what a manifest row says a shard is: its size and sha256 (storage's one digest type)


def shard_digests(shard_urls: list[str]) -> dict[str, ShardDigest]:
    """{shard URL: its manifest row's digest} for every shard that its split's manifest lists (the
    `{split}-manifest.parquet` beside it, as prep writes it), however the shards were named (manifest,
    pattern, glob): a shard prep wrote is always checked. Shards no manifest lists are absent."""
    by_manifest: dict[str, list[str]] = {}
    for url in shard_urls:
        split = split_of(url.rstrip("/").rsplit("/", 1)[-1])
        if split is not None:
            by_manifest.setdefault(manifest_url(parent_url(url), split), []).append(url)
    out: dict[str, ShardDigest] = {}
    for murl, urls in by_manifest.items():
        if not exists(murl, DataError):
            continue
        table = read_manifest(murl)
        rows = dict(zip(table.column("shard").to_pylist(),
                        map(ShardDigest, table.column("bytes").to_pylist(), table.column("sha256").to_pylist())))
        out.update({u: rows[name] for u in urls if (name := u.rstrip("/").rsplit("/", 1)[-1]) in rows})
    return out


def mismatch_error(shard_url: str, what: str) -> DataError:
    return DataError(f"shard {shard_url!r} does not match its manifest ({what}): it is corrupt or was replaced; "
                     "re-run the `lipnext prep` command that wrote it (it checks every shard's sha256 and "
                     "rewrites the bad ones)")


def file_digest(url: str) -> ShardDigest:
    """Size and sha256 of a whole file, read in bounded chunks (prep's check of finished shards)."""
    return storage_file_digest(url, DataError)
