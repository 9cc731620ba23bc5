"""Streaming input pipeline over WebDataset shards on any fsspec URL: resolve, read, load.

The loaders are torch DataLoaders over the webdataset pipelines of streams.py; `iter_shard_samples` is the
one reader of a single shard (eval transform or stored size), used by certification too.

    urls = resolve_shards("s3://bucket/imagenet/train-manifest.parquet")
    data = DataConfig(dataset="imagenet", batch_size=256, loader_processes=8, seed=0)
    loader = make_train_loader(urls, data, image_size=224, runtime=LoaderRuntime(rank=r, world_size=n))
    images, labels = next(iter(loader))   # float32 (B, 3, 224, 224) in [0, 1], int64 (B,)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator

from braceexpand import braceexpand

from lipnext_scale.config import DataConfig
from lipnext_scale.data.errors import DataError
from lipnext_scale.data.manifest import (
    manifest_meta, manifest_shard_urls, prefix_manifest_url, read_manifest, shard_digests,
)
from lipnext_scale.data.tar_reader import SkipStats, decode_raw, iter_raw_samples
from lipnext_scale.data.transforms import SampleError, check_dataset, eval_transform, to_float_chw
from lipnext_scale.storage import exists, glob, is_dir, list_dir, parent_url

if TYPE_CHECKING:
    import torch

_HOW = ("pass a manifest (.../train-manifest.parquet), a brace pattern (.../train-{000000..000009}.tar), "
        "a glob (.../train-*.tar), or a directory/prefix with a split (.../out/train)")


def _from_manifest(url: str) -> list[str]:
    if not exists(url, DataError):
        raise DataError(f"manifest {url!r} does not exist; run `lipnext prep ... --out {parent_url(url)}` "
                        f"first, or {_HOW}")
    table = read_manifest(url)
    meta = manifest_meta(table)
    if not meta.get("complete", False):
        raise DataError(f"manifest {url!r} is incomplete ({table.num_rows} of {meta.get('num_shards', '?')} "
                        "shards): the prep was interrupted; re-run the same `lipnext prep` command to finish it")
    if table.num_rows == 0:
        raise DataError(f"manifest {url!r} lists no shards; the split was empty at prep time")
    return manifest_shard_urls(url, table)


def _check_all_exist(urls: list[str], pattern: str) -> None:
    listed: dict[str, set[str]] = {}  # one listing per folder, not one request per shard
    missing = []
    for u in urls:
        parent, name = parent_url(u), u.rstrip("/").rsplit("/", 1)[-1]
        if parent not in listed:
            listed[parent] = {e.name for e in list_dir(parent, DataError, missing_ok=True)}
        if name not in listed[parent]:
            missing.append(u)
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist (first: "
                        f"{missing[0]!r}); fix the pattern's range or re-run prep")


def _glob(pattern: str) -> list[str]:
    return [u for u in glob(pattern, DataError) if u.endswith(".tar")]


def resolve_shards(url: str | list[str], *, split: str | None = None) -> list[str]:
    """Concrete shard URLs from a manifest URL, a brace pattern, a glob, one .tar, or a directory/prefix
    (+ `split`: `out/` with split="train" or `out/train` reads `out/train-manifest.parquet`, else
    `out/train-*.tar`). Raises DataError naming the URL and the fix if nothing readable is found."""
    if isinstance(url, (list, tuple)):
        if not url:
            raise DataError(f"empty shard list; {_HOW}")
        return [u for item in url for u in resolve_shards(item, split=split)]
    if not url:
        raise DataError(f"empty data URL (set data.train_url / data.eval_url); {_HOW}")
    if url.endswith(".parquet"):
        return _from_manifest(url)
    if "{" in url:
        urls = list(braceexpand(url))
        _check_all_exist(urls, url)
        return urls
    if any(c in url for c in "*?["):
        urls = _glob(url)
        if not urls:
            raise DataError(f"no .tar shard matches {url!r}; {_HOW}")
        return urls
    if url.rstrip("/").endswith(".tar"):
        if not exists(url, DataError):
            raise DataError(f"shard {url!r} does not exist; {_HOW}")
        return [url]
    if is_dir(url, DataError):
        if split is None:
            raise DataError(f"{url!r} is a directory: say which split to read (e.g. {url.rstrip('/')}/train); {_HOW}")
        url = f"{url.rstrip('/')}/{split}"
    manifest = prefix_manifest_url(url)
    if exists(manifest, DataError):
        return _from_manifest(manifest)
    urls = _glob(f"{url}-*.tar")
    if not urls:
        raise DataError(f"nothing found at {url!r}: neither {manifest!r} nor {url}-*.tar exists; {_HOW}")
    return urls


def iter_shard_samples(shard_url: str, *, image_size: int | None = None, dataset: str | None = None,
                       stats: SkipStats | None = None,
                       num_classes: int | None = None) -> Iterator[tuple[str, "torch.Tensor", int]]:
    """(key, image (3, H, W) float32 in [0, 1], label) for every good sample of one shard, in shard order.

    With `image_size` and `dataset`: the eval transform; without: the stored size (certification). Bad
    samples (a label outside 0..num_classes-1 among them) are skipped, counted in `stats` and logged
    (`SkipStats(strict=True)`: each is an error); a shard its manifest lists is checked against the
    manifest's sha256 (tar_reader.py has the rules)."""
    if (image_size is None) != (dataset is None):
        raise ValueError("give both image_size and dataset (the eval transform) or neither (the stored size)")
    if dataset is not None:
        check_dataset(dataset)
    stats = stats if stats is not None else SkipStats()
    expected = shard_digests([shard_url]).get(shard_url)
    for sample in iter_raw_samples(shard_url, stats, expected=expected):
        try:
            img, label = decode_raw(sample, num_classes)
        except SampleError as e:
            stats.skip(sample.shard, sample.key, str(e))
            continue
        yield sample.key, to_float_chw(img if dataset is None else eval_transform(img, dataset, image_size)), label


def _init_worker(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # decode is per-sample PIL work; intra-op threads only oversubscribe


def _one_line(message: str) -> str:
    """The worker's own DataError message out of torch's re-raise ("Caught DataError in DataLoader worker
    process 0.\nOriginal Traceback ...\nlipnext_scale.data.errors.DataError: <message>")."""
    prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
    last = [ln for ln in message.splitlines() if ln.startswith(prefix)]
    return last[-1][len(prefix):] if last else message


def _loader(dataset, num_workers: int, pin_memory: bool = False, to_float: bool = False):
    """`to_float`: the dataset yields uint8 image batches, turned into float32 ones here (streams.FloatBatches)."""
    from torch.utils.data import DataLoader

    from lipnext_scale.data.streams import FloatBatches

    class Loader(DataLoader):
        """A DataLoader whose DataErrors stay one line: torch re-raises a worker's exception with the
        worker's traceback folded into its message."""

        def __iter__(self):
            batches = super().__iter__()
            floats = FloatBatches() if to_float else None
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except DataError as e:
                    raise DataError(_one_line(str(e))) from None
                if floats is not None:  # a list, as the DataLoader hands batches over
                    batch = [floats(batch[0]), *batch[1:]]
                yield batch

    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: must be >= 0")
    return Loader(dataset, batch_size=None, num_workers=num_workers, worker_init_fn=_init_worker,
                  prefetch_factor=4 if num_workers else None, pin_memory=pin_memory)


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")


@dataclass(frozen=True)
class LoaderRuntime:
    """Where a loader runs in the job and how it hands batches over: facts of the running job, not settings a
    user writes (those are its `DataConfig`: data set, batch size, loader processes, shuffle buffer, seed).

    rank, world_size: this reader among all of them (each sample read by one rank). epoch: part of the
    train seed. start_batch: the first training batch to yield (a resumed run's position). deterministic: the
    train batch sequence is a pure function of (seed, epoch, rank, world_size, loader processes) and
    `start_batch=k` yields exactly the batches k, k+1, ... of a fresh loader (the skipped batches are read and
    decoded, not augmented); otherwise `start_batch` only re-seeds. uint8: images stay uint8 (0..255) for the
    consumer to normalise on its device. pin_memory: batches in page-locked memory, so a
    `.to("cuda", non_blocking=True)` copy overlaps compute."""

    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    start_batch: int = 0
    deterministic: bool = False
    uint8: bool = False
    pin_memory: bool = False


def make_train_loader(url: str | list[str], data: DataConfig, *, image_size: int, num_classes: int | None = None,
                      runtime: LoaderRuntime = LoaderRuntime()):
    """Infinite iterable of (images float32 (B,3,H,W) in [0,1], labels int64 (B,)) with augmentation, read
    from `url` (not data.train_url: a list of shard URLs works too) as `data` and `runtime` say.
    `num_classes`: a sample labelled outside 0..num_classes-1 is a counted, logged skip (tar_reader.py).
    Shards are drawn with replacement, per (rank, worker) stream, then pass a shuffle buffer."""
    from lipnext_scale.data.streams import TrainStream

    check_dataset(data.dataset)
    _check_rank(runtime.rank, runtime.world_size, data.batch_size)
    if runtime.start_batch < 0 or data.shuffle_buffer < 0:
        raise ValueError(f"start_batch={runtime.start_batch}, shuffle_buffer={data.shuffle_buffer}: both must "
                         "be >= 0")
    urls = resolve_shards(url, split="train")
    # Float batches are made from uint8 ones in this process (streams.FloatBatches), except where they are
    # pinned by the DataLoader's own thread, which must see the final batch.
    to_float = not runtime.uint8 and not runtime.pin_memory
    stream = TrainStream(urls, shard_digests(urls), data, image_size=image_size, num_classes=num_classes,
                         runtime=replace(runtime, uint8=True) if to_float else runtime)
    return _loader(stream, data.loader_processes, runtime.pin_memory, to_float)


def make_eval_loader(url: str | list[str], data: DataConfig, *, image_size: int, num_classes: int | None = None,
                     runtime: LoaderRuntime = LoaderRuntime()):
    """Finite iterable of (images, labels, keys: list[str]) read from `url` (not data.eval_url: a list of shard
    URLs works too): every sample exactly once over all ranks and workers (ranks may get different counts; the
    last batch of each worker may be short); a sample labelled outside 0..num_classes-1 is a counted, logged
    skip. Of `runtime`, only the rank and world size apply."""
    from lipnext_scale.data.streams import EvalStream

    check_dataset(data.dataset)
    _check_rank(runtime.rank, runtime.world_size, data.batch_size)
    urls = resolve_shards(url, split="val")
    stream = EvalStream(urls, shard_digests(urls), data, image_size=image_size, num_classes=num_classes,
                        runtime=replace(runtime, uint8=True))
    return _loader(stream, data.loader_processes, to_float=True)
