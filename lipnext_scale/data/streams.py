"""The two sample streams behind the loaders: webdataset pipelines around our tar-member stage.

    train  wds.ResampledShards -> read_shards -> wds.shuffle -> decode -> augment_from -> wds.batched
    eval   eval_parts          -> read_shards ->                decode ->                 wds.batched

Stock webdataset stages draw shards, shuffle and batch; ours are `read_shards` (tar_reader.py: checksums,
a truncated shard is an error or a counted skip, manifest sha256 checked while streaming; in training a
listed shard's samples pass only once it matched), `decode`
(bad samples counted), and the two stages a stock one cannot do, each saying why in its docstring:
`augment_from` (exact resume) and `eval_parts` (exactly-once evaluation over ranks x workers).

Work is split over `world_size` ranks x `num_workers` DataLoader workers = "streams". A worker builds its
pipeline when it starts iterating (only then does it know its id), seeded from (seed, epoch, rank,
world_size, num_workers, worker); the rank comes from the caller, never from the environment. Training
streams are split the way webdataset splits resampled data (one ResampledShards per stream, each with its
own seed); evaluation streams by `eval_parts`. Batches
are assembled inside each worker and the DataLoader hands them out round-robin by worker id, so the order
of batches is a pure function of the seeds: that is what makes exact resume possible. A worker writes its
batch straight into shared memory (`batch_tensor`); float training batches are made from uint8 ones in the
consumer's process, in reused memory (`FloatBatches`).
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from lipnext_scale.data.errors import DataError
from lipnext_scale.data.manifest import ShardDigest
from lipnext_scale.data.tar_reader import (TRAINING_SUFFIXES, SkipStats, decode_raw, iter_raw_samples,
                                           iter_verified_samples)
from lipnext_scale.data.transforms import SampleError, eval_transform, hwc_to_chw_batch, to_uint8_hwc, train_crop

if TYPE_CHECKING:
    from lipnext_scale.config import DataConfig
    from lipnext_scale.data.shards import LoaderRuntime


def stream_seed(*parts) -> int:
    """A 64-bit seed from any parts; stable across processes and Python runs (unlike hash())."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def eval_assignment(num_shards: int, num_streams: int, stream: int) -> list[tuple[int, int, int]]:
    """(shard index, part, number of parts) read by `stream`; together the streams cover every sample once.

    With at least as many shards as streams, whole shards go round-robin. With fewer shards, each
    shard is read by several streams, stream `s` keeping the samples whose index in the shard is
    congruent to its part: no stream idles and nothing is read twice.
    """
    if num_shards >= num_streams:
        return [(i, 0, 1) for i in range(stream, num_shards, num_streams)]
    shard = stream % num_shards
    return [(shard, stream // num_shards, len(range(shard, num_streams, num_shards)))]


def resume_role(worker: int, num_workers: int, start_batch: int) -> tuple[int, int]:
    """Which original worker `worker` impersonates after resuming at global batch `start_batch`, and
    how many of that worker's batches to skip. Batch b came from worker b % W as its (b // W)-th."""
    shifted = worker + start_batch
    return shifted % num_workers, shifted // num_workers


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.num_workers, info.id) if info is not None else (1, 0)


def read_shards(shards: Iterable[dict], stats: SkipStats, digests: dict[str, ShardDigest],
                max_empty: int | None = None, verify_first: bool = False) -> Iterator:
    """Our tar-member stage: {"url", optional "part"/"parts"} -> RawSample, keeping the samples whose index
    in the shard is congruent to `part` mod `parts`. `max_empty`: consecutive shards without a readable
    sample after which a resampled (endless) stream gives up with an error instead of spinning.
    `verify_first` (training): a listed shard's samples come only once it matched its manifest, else it is
    a counted skip (tar_reader.py's error rules)."""
    empty = 0
    for shard in shards:
        part, parts = shard.get("part", 0), shard.get("parts", 1)
        got = False
        url, expected = shard["url"], digests.get(shard["url"])
        if verify_first and expected is not None:
            samples = iter_verified_samples(url, stats, TRAINING_SUFFIXES, expected)
        else:
            samples = iter_raw_samples(url, stats, TRAINING_SUFFIXES, expected)
        for i, sample in enumerate(samples):
            got = True
            if i % parts == part:
                yield sample
        empty = 0 if got else empty + 1
        if max_empty is not None and empty > max_empty:
            raise DataError(f"no readable sample in {empty} consecutive shard draws (last: {shard['url']!r}); "
                            "check the shards")


def decode(samples: Iterable, stats: SkipStats,
           num_classes: int | None = None) -> Iterator[tuple[str, object, int]]:
    """RawSample -> (key, RGB PIL image, label); an undecodable sample, or one whose label is outside
    0..num_classes-1, is counted, logged with shard and key, and dropped (never reaches the loss)."""
    for sample in samples:
        try:
            img, label = decode_raw(sample, num_classes)
        except SampleError as e:
            stats.skip(sample.shard, sample.key, str(e))
            continue
        yield sample.key, img, label


def augment_from(samples: Iterable, first: int, base: int, dataset: str, image_size: int) -> Iterator:
    """(key, image, label) -> (uint8 HWC augmented image, label), dropping the first `first` samples.

    Hand-written for exact resume: sample n of the stream is augmented with a generator seeded by
    (base, n), so the augmentation of a sample does not depend on what came before; a resumed stream drops
    the samples of the batches already trained on, after decoding them (a corrupt image is dropped
    exactly as in the original run) but without augmenting them. webdataset's stages draw augmentation
    randomness from one running generator, which cannot be fast-forwarded without replaying every draw.
    """
    for n, (_, img, label) in enumerate(samples):
        if n >= first:
            img, mirror = train_crop(img, dataset, image_size, random.Random(base ^ (n * 0x9E3779B1)))
            yield to_uint8_hwc(img, mirror), label


def eval_parts(urls: list[str], rank: int, world_size: int) -> Iterator[dict]:
    """The (shard, part) reads of this rank's DataLoader worker: every sample once over ranks x workers.

    Hand-written because `wds.split_by_node` reads the rank from RANK/WORLD_SIZE or torch.distributed
    (our loaders receive it as an argument, before or without a process group) and, like
    `wds.split_by_worker`, hands out whole shards only: with fewer shards than streams some would idle
    (a rank with no data stalls a collective eval). `eval_assignment` splits such shards by sample index.
    """
    num_workers, worker = _worker()
    stream = rank * num_workers + worker
    for shard, part, parts in eval_assignment(len(urls), world_size * num_workers, stream):
        yield {"url": urls[shard], "part": part, "parts": parts}


def shuffle_stage(buffer_size: int, rng: random.Random):
    """webdataset's shuffle buffer, filled before the first release and driven by an explicit generator
    (its default seeds from the pid and the clock, which would make the stream irreproducible)."""
    return wds.shuffle(buffer_size, initial=buffer_size, rng=rng)


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch tensor; in a DataLoader worker it lives in shared memory from the start (as
    torch's default_collate does), so handing it to the main process passes a file descriptor. Built in
    private memory, the worker would copy all of it into a fresh shared segment on the way out: for a float
    ImageNet batch of 64 (38 MB) that copy and its page faults cost as much as the conversion itself."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def images_batch(images: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 HWC images -> one (B, 3, H, W) batch, float32 in [0, 1] or uint8 (`hwc_to_chw_batch`)."""
    height, width, channels = images[0].shape
    return hwc_to_chw_batch(images, batch_tensor((len(images), channels, height, width), dtype))


def collate_train(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples)
    return images_batch(images), torch.tensor(labels, dtype=torch.int64)


def collate_train_uint8(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batches: a quarter of the bytes to pin and copy to the GPU; the consumer normalises on the device
    (`images.float().div_(255)`, the same float32 values `collate_train` gives)."""
    images, labels = zip(*samples)
    return images_batch(images, torch.uint8), torch.tensor(labels, dtype=torch.int64)


class FloatBatches:
    """uint8 batches -> float32 batches in [0, 1] (`.float().div_(255)`, bit for bit), made in the consumer's
    process in memory it reuses. A worker then hands over a quarter of the bytes, and the float batch lands
    in pages already mapped: a fresh buffer per batch (38 MB for 64 ImageNet images) costs, in page faults
    alone, as much CPU as decoding a fifth of its images. A buffer is reused only once nothing refers to
    it: every tensor made from it (views and `.numpy()` included) keeps its array alive, so the array's
    reference count says when the consumer has let go of the batch; one it keeps is never overwritten."""

    KEEP = 8  # buffers tracked; a consumer holding more batches than this gets fresh ones

    def __init__(self):
        self.arrays: list[np.ndarray] = []

    def _buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        for i in range(len(self.arrays)):
            # 2 references: the list's and getrefcount's argument; a live tensor or view holds a third
            if self.arrays[i].shape == shape and sys.getrefcount(self.arrays[i]) == 2:
                return self.arrays[i]
        array = np.empty(shape, dtype=np.float32)
        if len(self.arrays) < self.KEEP:
            self.arrays.append(array)
        return array

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(self._buffer(tuple(images.shape)))
        return out.copy_(images).div_(255.0)


def collate_eval(samples: list, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    keys, images, labels = zip(*samples)
    return images_batch(images, dtype), torch.tensor(labels, dtype=torch.int64), list(keys)


def collate_eval_uint8(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return collate_eval(samples, torch.uint8)


class TrainStream(IterableDataset):
    """Infinite stream of augmented batches; shards drawn with replacement per (rank, worker)."""

    def __init__(self, urls: list[str], digests: dict[str, ShardDigest], data: DataConfig, *, image_size: int,
                 num_classes: int | None, runtime: LoaderRuntime):
        self.uint8, self.num_classes = runtime.uint8, num_classes
        self.urls, self.digests, self.image_size, self.batch_size = urls, digests, image_size, data.batch_size
        self.dataset, self.rank, self.world_size = data.dataset, runtime.rank, runtime.world_size
        self.seed, self.epoch, self.start_batch = data.seed, runtime.epoch, runtime.start_batch
        self.shuffle_buffer, self.deterministic = data.shuffle_buffer, runtime.deterministic
        self.stats = SkipStats()

    def pipeline(self, base: int, skip_batches: int) -> wds.DataPipeline:
        # ResampledShards folds its seed to 31 bits (webdataset's make_seed); with `worker_seed` constant,
        # the per-stream seed is ours. A collision only makes two streams draw the same shard sequence.
        return wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=base, worker_seed=lambda: 0, deterministic=True),
            lambda shards: read_shards(shards, self.stats, self.digests, max_empty=2 * len(self.urls) + 8,
                                       verify_first=True),
            shuffle_stage(self.shuffle_buffer, random.Random(base + 1)),
            lambda samples: decode(samples, self.stats, self.num_classes),
            lambda samples: augment_from(samples, skip_batches * self.batch_size, base, self.dataset,
                                         self.image_size),
            wds.batched(self.batch_size, collation_fn=collate_train_uint8 if self.uint8 else collate_train,
                        partial=False),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        num_workers, worker = _worker()
        if self.deterministic:
            role, skip, salt = *resume_role(worker, num_workers, self.start_batch), ""
        else:  # a resumed run gets fresh randomness instead of paying to replay the stream
            role, skip, salt = worker, 0, f"from{self.start_batch}"
        base = stream_seed("train", self.seed, self.epoch, self.rank, self.world_size, num_workers, role, salt)
        return iter(self.pipeline(base, skip))


class EvalStream(IterableDataset):
    """Every sample exactly once across all ranks and workers; yields (images, labels, keys)."""

    def __init__(self, urls: list[str], digests: dict[str, ShardDigest], data: DataConfig, *, image_size: int,
                 num_classes: int | None, runtime: LoaderRuntime):
        self.urls, self.digests, self.image_size, self.batch_size = urls, digests, image_size, data.batch_size
        self.dataset, self.rank, self.world_size = data.dataset, runtime.rank, runtime.world_size
        self.num_classes, self.uint8 = num_classes, runtime.uint8
        self.stats = SkipStats()

    def pipeline(self) -> wds.DataPipeline:
        return wds.DataPipeline(
            lambda: eval_parts(self.urls, self.rank, self.world_size),
            lambda shards: read_shards(shards, self.stats, self.digests),
            lambda samples: decode(samples, self.stats, self.num_classes),
            lambda samples: ((key, to_uint8_hwc(eval_transform(img, self.dataset, self.image_size)), label)
                             for key, img, label in samples),
            wds.batched(self.batch_size, collation_fn=collate_eval_uint8 if self.uint8 else collate_eval,
                        partial=True),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        return iter(self.pipeline())
