"""Preprocess a data set into WebDataset shards with one Ray task per output shard; resumable.

Shard contents are a pure function of (source listing, settings): keys and their assignment to
shards are deterministic, tar headers carry no timestamps, so the same input gives the same bytes.
The manifest is rewritten (atomically) as shards complete, so an interrupted prep resumes by
skipping every shard the manifest lists with an unchanged plan and whose bytes still match the row's
size and sha256 (a shard corrupted since is rewritten); a shard is written under a temporary name and
renamed, so a half-written shard is never visible under its final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lipnext_scale.data.errors import DataError
from lipnext_scale.data.manifest import (ShardDigest, file_digest, manifest_meta, manifest_rows, manifest_url,
                                         read_manifest, shard_name, write_classes, write_manifest)
from lipnext_scale.data.sources import KINDS, list_source
from lipnext_scale.data.sources.base import SourceSample
from lipnext_scale.data.transforms import SampleError
from lipnext_scale.storage import (atomic_write_bytes, check_url, exists, glob, is_process_local, join_url, list_dir,
                                   makedirs, remove)

log = logging.getLogger("lipnext_scale.data")

MANIFEST_WRITE_INTERVAL_S = 5.0
SETTINGS_KEYS = ("kind", "image_size", "quality", "shard_size", "image_format", "num_classes")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster when submitted as a Ray job (RAY_ADDRESS), else start a local instance."""
    from lipnext_scale.runtime import connect_ray

    connect_ray(num_cpus=num_cpus)


def plan_digest(split: str, index: int, settings: dict[str, Any], samples: list[SourceSample]) -> str:
    h = hashlib.sha256(json.dumps([split, index, settings], sort_keys=True).encode())
    for s in samples:
        h.update(f"\n{s.key}\t{s.label}\t{s.origin}".encode())
    return h.hexdigest()


def build_shard(samples: list[SourceSample], settings: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Encode samples into one tar (bytes) + its stats; unreadable source images are skipped and listed."""
    from webdataset import TarWriter

    from lipnext_scale.data.encode import encode_image

    buf = io.BytesIO()
    counts = [0] * settings["num_classes"]
    skipped = []
    with TarWriter(buf, user="", group="", mtime=0, encoder=False) as tar:
        for s in samples:
            try:
                data, ext, size, fmt = encode_image(s.ref.read(), settings["image_size"],
                                                    settings["image_format"], settings["quality"])
            except (SampleError, DataError, OSError) as e:  # DataError: the source file is gone or unreadable
                skipped.append((s.origin, str(e)))
                continue
            meta = {"class": settings["classes"][s.label], "origin": s.origin, "original_size": list(size),
                    "original_format": fmt}
            tar.write({"__key__": s.key, ext: data, "cls": str(s.label).encode(),
                       "json": json.dumps(meta, sort_keys=True).encode()})
            counts[s.label] += 1
    data = buf.getvalue()
    stats = {"samples": sum(counts), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "class_counts": counts, "skipped": skipped}
    return data, stats


def _shard_task(url: str, samples: list[SourceSample], settings: dict[str, Any], return_bytes: bool):
    data, stats = build_shard(samples, settings)
    if return_bytes:  # process-local filesystem (memory://): the driver writes it
        return stats, data
    atomic_write_bytes(url, data, DataError)
    return stats, None


def _existing_rows(out_url: str, split: str, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The manifest's rows whose shard exists with the listed size (settings must match, else DataError);
    `_verified` then checks their sha256."""
    url = manifest_url(out_url, split)
    if not exists(url, DataError):
        return {}
    table = read_manifest(url)
    old = manifest_meta(table)
    changed = [k for k in SETTINGS_KEYS if old.get(k) != settings[k]]
    if changed:
        raise DataError(f"{url!r} was written with different settings ({', '.join(f'{k}={old.get(k)!r}' for k in changed)}"
                        f" vs now {', '.join(f'{k}={settings[k]!r}' for k in changed)}); use a new --out "
                        "or delete that output to start over")
    sizes = {e.name: e.size for e in list_dir(out_url, DataError)}
    return {r["index"]: r for r in manifest_rows(table) if sizes.get(r["shard"]) == r["bytes"]}


def _verified(out_url: str, rows: dict[int, dict[str, Any]], workers: int) -> dict[int, dict[str, Any]]:
    """The rows whose shard's bytes hash to the row's sha256 (read in bounded chunks, `workers` at once:
    hashlib releases the GIL); a mismatch is logged and the shard is rewritten."""
    def matches(row: dict[str, Any]) -> bool:
        try:
            return file_digest(join_url(out_url, row["shard"])) == ShardDigest(row["bytes"], row["sha256"])
        except DataError:
            return False

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ok = dict(zip(rows, pool.map(matches, rows.values())))
    for i, row in rows.items():
        if not ok[i]:
            log.warning("prep: %s does not match its manifest's sha256; rewriting it", row["shard"])
    return {i: row for i, row in rows.items() if ok[i]}


def _remove_stale_temporaries(out_url: str, split: str) -> None:
    for url in glob(join_url(out_url, f"{split}-*.tmp-*"), DataError):
        remove(url, DataError)


def _run_split(split: str, samples: list[SourceSample], out_url: str, settings: dict[str, Any],
               workers: int, progress: bool) -> dict[str, Any]:
    import ray
    from tqdm import tqdm

    size = settings["shard_size"]
    chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
    digests = [plan_digest(split, i, settings, c) for i, c in enumerate(chunks)]
    meta = {**{k: settings[k] for k in SETTINGS_KEYS}, "split": split, "num_shards": len(chunks),
            "complete": False}
    done = _verified(out_url, {i: r for i, r in _existing_rows(out_url, split, settings).items()
                               if i < len(chunks) and r["plan_digest"] == digests[i]}, workers)
    _remove_stale_temporaries(out_url, split)
    todo = [i for i in range(len(chunks)) if i not in done]
    return_bytes = is_process_local(out_url)
    task = ray.remote(num_cpus=1, max_retries=2)(_shard_task)
    settings_ref = ray.put(settings)
    pending: dict[Any, int] = {}
    skipped: list[tuple[str, str]] = []
    failures: list[str] = []
    bar = tqdm(total=len(chunks), initial=len(done), desc=f"{settings['kind']} {split}", unit="shard",
               disable=not progress)
    last_write = 0.0
    todo_iter = iter(todo)
    while True:
        while len(pending) < workers and (i := next(todo_iter, None)) is not None:
            url = join_url(out_url, shard_name(split, i))
            pending[task.remote(url, chunks[i], settings_ref, return_bytes)] = i
        if not pending:
            break
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ref)
        try:
            stats, data = ray.get(ref)
        except Exception as e:  # keep the other shards; the manifest stays incomplete
            failures.append(f"{shard_name(split, i)}: {e}")
            continue
        if data is not None:
            atomic_write_bytes(join_url(out_url, shard_name(split, i)), data, DataError)
        skipped += [tuple(x) for x in stats.pop("skipped")]
        done[i] = {"split": split, "index": i, "shard": shard_name(split, i), "plan_digest": digests[i], **stats}
        bar.update(1)
        if time.monotonic() - last_write > MANIFEST_WRITE_INTERVAL_S:
            write_manifest(manifest_url(out_url, split), list(done.values()), meta)
            last_write = time.monotonic()
    bar.close()
    meta["complete"] = not failures and len(done) == len(chunks)
    write_manifest(manifest_url(out_url, split), list(done.values()), meta)
    if failures:
        raise DataError(f"{len(failures)} shard(s) of {split} failed (first: {failures[0]}); the manifest "
                        "lists the others: fix the cause and re-run the same command to resume")
    written = [done[i] for i in todo]
    return {"shards": len(chunks), "shards_written": len(todo), "shards_skipped": len(chunks) - len(todo),
            "samples": sum(r["samples"] for r in done.values()),
            "samples_written": sum(r["samples"] for r in written),
            "bytes": sum(r["bytes"] for r in done.values()), "skipped_files": skipped}


@dataclass(frozen=True)
class ShardFormat:
    """How the shards are written, recorded in the manifest (a rerun into the same output must match it):
    `shard_size` samples per shard, images stored at `image_size` (None: the data set's default, 256 ImageNet,
    64 Tiny-ImageNet, 32 CIFAR and digits) with JPEG `quality`."""

    shard_size: int = 1000
    image_size: int | None = None
    quality: int = 95


def prepare(kind: str, source: str | None, out_url: str, fmt: ShardFormat = ShardFormat(), *,
            workers: int | None = None, splits: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Write `{split}-NNNNNN.tar` shards, `{split}-manifest.parquet` and `classes.json` under `out_url`.

    `workers` caps concurrent shard tasks (default: the cluster's CPUs). Returns a summary dict.
    """
    shard_size, image_size, quality = fmt.shard_size, fmt.image_size, fmt.quality
    if kind not in KINDS:
        raise ValueError(f"unknown data set kind {kind!r}; choose one of {', '.join(KINDS)}")
    if shard_size < 1 or not 1 <= quality <= 100 or (image_size is not None and image_size < 1):
        raise ValueError(f"shard_size={shard_size}, quality={quality}, image_size={image_size}: need "
                         "shard_size >= 1, 1 <= quality <= 100, image_size >= 1")
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers}: need at least 1 concurrent shard task (omit it to use the "
                         "cluster's CPUs)")
    if not isinstance(out_url, str) or not out_url.strip():
        raise DataError(f"output URL {out_url!r} is empty: give a directory path or an fsspec URL "
                        "(e.g. data/digits or s3://bucket/imagenet)")
    check_url(out_url, DataError)  # an unknown protocol fails before the source is listed
    plan = list_source(kind, source, splits)
    settings = {"kind": kind, "image_size": image_size or plan.default_image_size, "quality": quality,
                "shard_size": shard_size, "image_format": plan.image_format, "num_classes": len(plan.classes),
                "classes": plan.classes}
    try:
        makedirs(out_url, DataError)
    except DataError as e:
        raise DataError(f"cannot create the output directory {out_url!r}: {e}; give a writable directory path "
                        "or URL") from None
    for split in plan.splits:  # refuse a mismatched earlier prep before writing anything
        _existing_rows(out_url, split, settings)
    write_classes(out_url, {"kind": kind, "num_classes": len(plan.classes), "classes": plan.classes,
                            "names": plan.names or plan.classes})
    ensure_ray()
    import ray

    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    start = time.monotonic()
    per_split = {split: _run_split(split, samples, out_url, settings, workers, progress)
                 for split, samples in plan.splits.items()}
    seconds = time.monotonic() - start
    skipped = plan.skipped + [x for s in per_split.values() for x in s.pop("skipped_files")]
    written = sum(s["samples_written"] for s in per_split.values())
    summary = {
        "kind": kind, "out": out_url, "image_size": settings["image_size"], "image_format": plan.image_format,
        "num_classes": len(plan.classes), "splits": per_split, "images_written": written,
        "seconds": round(seconds, 3), "images_per_s": round(written / seconds, 1) if seconds > 0 else None,
        "workers": workers, "files_skipped": len(skipped),
        "files_skipped_by_reason": dict(Counter(reason.split(" (")[0] for _, reason in skipped)),
        "files_skipped_examples": [list(x) for x in skipped[:20]],
    }
    for origin, reason in skipped[:20]:
        log.warning("prep skipped %s: %s", origin, reason)
    return summary
