"""Read WebDataset tar shards from any fsspec URL as raw samples, skipping (and counting) bad ones.

Only `.jpg/.jpeg/.png/.cls/.json` members are read at all: anything else (a `.pyd` or pickle member)
is neither read nor decoded. A sample is the run of consecutive members sharing a key (the file name
up to its first dot), as WebDataset writes them.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from lipnext_scale.data.tar_stream import TarError, iter_tar_members
from lipnext_scale.data.transforms import SampleError, decode_image

log = logging.getLogger("lipnext_scale.data")

IMAGE_SUFFIXES = ("jpg", "jpeg", "png")
DECODED_SUFFIXES = frozenset(IMAGE_SUFFIXES + ("cls", "json"))
TRAINING_SUFFIXES = frozenset(IMAGE_SUFFIXES + ("cls",))  # .json is metadata the loaders never use


@dataclass
class SkipStats:
    """Samples skipped by this process, by reason; each skip is also logged with shard and key."""
    by_reason: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def skip(self, shard: str, key: str, reason: str) -> None:
        self.by_reason[reason.split(" (")[0]] += 1
        log.warning("skipped sample %r in shard %s: %s", key, shard, reason)


@dataclass
class RawSample:
    key: str
    shard: str
    members: dict[str, bytes]


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    prefix = name[: len(name) - len(base)]
    return prefix + stem, ext.lower()


def iter_raw_samples(shard_url: str, stats: SkipStats,
                     suffixes: frozenset[str] = DECODED_SUFFIXES) -> Iterator[RawSample]:
    """Group the members with `suffixes` (a subset of .jpg/.jpeg/.png/.cls/.json) of one shard by key;
    a truncated/corrupt shard is counted, logged and ends (a broken tar stream cannot be resynchronised)."""
    suffixes = suffixes & DECODED_SUFFIXES
    current: RawSample | None = None
    try:
        with fsspec.open(shard_url, "rb") as f:
            for name, data in iter_tar_members(f, lambda n: _split_name(n)[1] in suffixes):
                key, ext = _split_name(name)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key, shard_url, {})
                current.members[ext] = data
    except FileNotFoundError:
        stats.skip(shard_url, "<shard>", "shard missing")
        return
    except TarError as e:
        if current is not None and e.member is not None and _split_name(e.member)[0] != current.key:
            yield current  # all its members were read before the cut
            current = None
        where = current.key if current else (_split_name(e.member)[0] if e.member else "<end of shard>")
        stats.skip(shard_url, where, f"unreadable shard ({e})")
        return
    except Exception as e:  # truncated or corrupt tar, a network error mid-stream
        stats.skip(shard_url, current.key if current else "<shard>", f"unreadable shard ({type(e).__name__}: {e})")
        return
    if current is not None:
        yield current


def parse_label(sample: RawSample) -> int:
    raw = sample.members.get("cls")
    if raw is None:
        raise SampleError("missing .cls member")
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise SampleError(f"bad .cls member {raw[:20]!r}") from e


def image_bytes(sample: RawSample) -> bytes:
    for ext in IMAGE_SUFFIXES:
        if ext in sample.members:
            return sample.members[ext]
    raise SampleError("missing image member (.jpg/.png)")


def parse_meta(sample: RawSample) -> dict:
    raw = sample.members.get("json")
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except ValueError as e:
        raise SampleError("bad .json member") from e


def decode_raw(sample: RawSample):
    """(RGB PIL image, label) or SampleError."""
    label = parse_label(sample)
    return decode_image(image_bytes(sample)), label


def shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: once `buffer_size` items are buffered, each new one releases a random buffered one."""
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) >= buffer_size:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf
