"""`{split}-manifest.parquet` and `classes.json`: what prep wrote, and what the loader and resume trust.

One manifest row per completed shard: `shard` is the file name relative to the manifest's directory
(so a prepared data set can be copied between buckets), `samples`, `bytes`, `sha256`, `class_counts`
(a list indexed by label) and `plan_digest` (a hash of the keys and prep settings the shard was
planned with: resume only skips a shard whose plan is unchanged). The schema metadata holds the
prep settings and `complete` (false while a prep is still running or was interrupted).
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lipnext_scale.data.urls import DataError, atomic_write_bytes, join_url, parent_url, read_bytes

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


def manifest_url(out_url: str, split: str) -> str:
    return join_url(out_url, f"{split}-manifest.parquet")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_manifest(url: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Atomically write the manifest at `url`: rows sorted by shard index, `meta` in the schema metadata."""
    rows = sorted(rows, key=lambda r: r["index"])
    columns = {name: [r[name] for r in rows] for name in MANIFEST_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(url, buf.getvalue())


def read_manifest(url: str) -> pa.Table:
    """The manifest as a pyarrow Table (see `manifest_meta` and `manifest_rows`)."""
    data = read_bytes(url)
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
    atomic_write_bytes(join_url(out_url, "classes.json"), json.dumps(info, indent=1).encode())


def read_classes(out_url: str) -> dict[str, Any]:
    return json.loads(read_bytes(join_url(out_url, "classes.json")))
