"""The two sample streams behind the loaders: resampled training batches and exactly-once eval batches.

Work is split over `world_size` ranks x `num_workers` DataLoader workers = "streams". Batches are
assembled inside each worker and the DataLoader hands them out round-robin by worker id, so the
order of batches is a pure function of the seeds: that is what makes exact resume possible.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lipnext_scale.data.tar_reader import TRAINING_SUFFIXES, SkipStats, decode_raw, iter_raw_samples, shuffled
from lipnext_scale.data.transforms import (SampleError, eval_transform, stack_to_float, to_uint8_chw,
                                           train_augment)
from lipnext_scale.data.urls import DataError


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


class TrainStream(IterableDataset):
    """Infinite stream of augmented batches; shards drawn with replacement per (rank, worker)."""

    def __init__(self, urls: list[str], *, image_size: int, batch_size: int, dataset: str, rank: int,
                 world_size: int, seed: int, epoch: int, start_batch: int, shuffle_buffer: int,
                 deterministic: bool):
        self.urls, self.image_size, self.batch_size, self.dataset = urls, image_size, batch_size, dataset
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.start_batch, self.shuffle_buffer, self.deterministic = start_batch, shuffle_buffer, deterministic
        self.stats = SkipStats()

    def _resampled_samples(self, rng: random.Random):
        empty_draws = 0
        while True:
            url = self.urls[rng.randrange(len(self.urls))]
            got = False
            for sample in iter_raw_samples(url, self.stats, TRAINING_SUFFIXES):
                got = True
                yield sample
            empty_draws = 0 if got else empty_draws + 1
            if empty_draws > 2 * len(self.urls) + 8:
                raise DataError(f"no readable sample in {empty_draws} consecutive shard draws from "
                                f"{self.urls[0]!r} and {len(self.urls) - 1} more; check the shards")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        num_workers, worker = _worker()
        if self.deterministic:
            role, skip, salt = *resume_role(worker, num_workers, self.start_batch), ""
        else:  # a resumed run gets fresh randomness instead of paying to replay the stream
            role, skip, salt = worker, 0, f"from{self.start_batch}"
        base = stream_seed("train", self.seed, self.epoch, self.rank, self.world_size, num_workers, role, salt)
        shard_rng, buffer_rng = random.Random(base), random.Random(base + 1)
        images, labels, batch_index, n = [], [], 0, 0
        for sample in shuffled(self._resampled_samples(shard_rng), self.shuffle_buffer, buffer_rng):
            try:
                img, label = decode_raw(sample)  # decoded even in skipped batches: a corrupt image
            except SampleError as e:             # must be dropped exactly as in the original run
                self.stats.skip(sample.shard, sample.key, str(e))
                continue
            if batch_index >= skip:
                img = train_augment(img, self.dataset, self.image_size, random.Random(base ^ (n * 0x9E3779B1)))
                images.append(to_uint8_chw(img))
            labels.append(label)
            n += 1
            if len(labels) == self.batch_size:
                if batch_index >= skip:
                    yield stack_to_float(images), torch.tensor(labels, dtype=torch.int64)
                images, labels, batch_index = [], [], batch_index + 1


class EvalStream(IterableDataset):
    """Every sample exactly once across all ranks and workers; yields (images, labels, keys)."""

    def __init__(self, urls: list[str], *, image_size: int, batch_size: int, dataset: str, rank: int,
                 world_size: int):
        self.urls, self.image_size, self.batch_size, self.dataset = urls, image_size, batch_size, dataset
        self.rank, self.world_size = rank, world_size
        self.stats = SkipStats()

    def samples(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        num_workers, worker = _worker()
        stream = self.rank * num_workers + worker
        for shard, part, parts in eval_assignment(len(self.urls), self.world_size * num_workers, stream):
            for i, sample in enumerate(iter_raw_samples(self.urls[shard], self.stats, TRAINING_SUFFIXES)):
                if i % parts != part:
                    continue
                try:
                    img, label = decode_raw(sample)
                except SampleError as e:
                    self.stats.skip(sample.shard, sample.key, str(e))
                    continue
                yield sample.key, to_uint8_chw(eval_transform(img, self.dataset, self.image_size)), label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        images, labels, keys = [], [], []
        for key, image, label in self.samples():
            images.append(image)
            labels.append(label)
            keys.append(key)
            if len(keys) == self.batch_size:
                yield stack_to_float(images), torch.tensor(labels, dtype=torch.int64), keys
                images, labels, keys = [], [], []
        if keys:
            yield stack_to_float(images), torch.tensor(labels, dtype=torch.int64), keys
