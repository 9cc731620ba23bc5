"""Our tar-member stage: one WebDataset shard on any fsspec URL -> raw samples, bad ones counted and logged.

Kept hand-written inside the webdataset pipelines (streams.py) instead of webdataset's `url_opener` +
`tar_file_expander` + `group_by_keys`: it is ~5x cheaper per member (tar_stream.py), checks every header's
checksum and calls a shard cut at a header boundary truncated (tarfile sees a clean end there), reads only
the `.jpg/.jpeg/.png/.cls/.json` members (a `.pyd` or pickle member is neither read nor decoded), skips
the rest without holding them, and hashes the bytes as they stream past to check the shard against its
manifest. A sample is the run of consecutive members sharing a key (the file name up to its first dot).

Error rules, the same for training, evaluation and certification:
- a bad sample (undecodable image, missing or bad label, a label outside the model's classes, oversized
  member) is skipped, counted in `SkipStats` and logged with shard and key; `SkipStats(strict=True)` makes
  it an error instead (certification never skips: a dropped sample would make its accuracy a lie). The
  label range is checked here, on every path (manifest, loose shards, patterns, globs), because only a
  manifest's class counts let the job-start check see the labels; a loose shard's are seen only here;
- a shard its manifest lists must match the manifest's size and sha256. Evaluation and certification
  stream it and a mismatch, a truncated or unreadable shard is a DataError naming the shard and the fix
  (the hash is only known once the shard has streamed past: an accuracy over wrong samples must not be
  reported). Training (`iter_verified_samples`) holds a listed shard's samples until the whole shard has
  matched: a shard deleted, cut short or rewritten while the run reads it is a counted skip naming the
  mismatch, none of its samples used, and the run goes on with the others (the cost: one shard's raw
  members in memory per loader stream, as much as the shuffle buffer holds);
- a shard no manifest lists (hand-made, a glob of foreign shards) has nothing to check against: a
  missing, truncated or corrupt one is counted and logged, and what was readable before the damage is kept.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from lipnext_scale.data.errors import DataError
from lipnext_scale.data.manifest import ShardDigest, mismatch_error
from lipnext_scale.data.tar_stream import TarError, iter_tar_members
from lipnext_scale.data.transforms import SampleError, decode_image
from lipnext_scale.storage import HashingReader, open_url, verify_digest

log = logging.getLogger("lipnext_scale.data")

IMAGE_SUFFIXES = ("jpg", "jpeg", "png")
DECODED_SUFFIXES = frozenset(IMAGE_SUFFIXES + ("cls", "json"))
TRAINING_SUFFIXES = frozenset(IMAGE_SUFFIXES + ("cls",))  # .json is metadata the loaders never use
# A stored image is a few hundred KB at most; a member above this is skipped (by seeking, not read) and
# counted, so one bad member cannot cost a loader worker its size in memory.
MAX_MEMBER_BYTES = 64 << 20


@dataclass
class SkipStats:
    """Samples skipped by this process, by reason; each skip is also logged with shard and key.
    `strict`: a skip raises DataError instead (certification)."""
    by_reason: Counter = field(default_factory=Counter)
    strict: bool = False

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def skip(self, shard: str, key: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"shard {shard!r}, sample {key!r}: {reason}; re-create the shard with `lipnext prep` "
                            "(it resumes and rewrites bad shards)")
        self.by_reason[reason.split(" (")[0]] += 1
        log.warning("skipped sample %r in shard %s: %s", key, shard, reason)


@dataclass
class RawSample:
    key: str
    shard: str
    members: dict[str, bytes]
    problem: str | None = None  # why the sample cannot be used although its members were grouped


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    prefix = name[: len(name) - len(base)]
    return prefix + stem, ext.lower()


def iter_raw_samples(shard_url: str, stats: SkipStats, suffixes: frozenset[str] = DECODED_SUFFIXES,
                     expected: ShardDigest | None = None) -> Iterator[RawSample]:
    """Group the members with `suffixes` (a subset of .jpg/.jpeg/.png/.cls/.json) of one shard by key.
    `expected`: the shard's manifest digest, checked while streaming (see the module's error rules)."""
    suffixes = suffixes & DECODED_SUFFIXES
    current: RawSample | None = None
    opened = False
    try:
        with open_url(shard_url, "rb", DataError) as f:
            opened = True
            reader = HashingReader(f) if expected is not None else f
            for name, data in iter_tar_members(reader, lambda n: _split_name(n)[1] in suffixes, MAX_MEMBER_BYTES):
                key, ext = _split_name(name)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key, shard_url, {})
                if data is None:
                    current.problem = f"oversized .{ext} member (over MAX_MEMBER_BYTES = {MAX_MEMBER_BYTES} bytes)"
                else:
                    current.members[ext] = data
            if expected is not None:
                verify_digest(reader.finish(), expected, lambda what: mismatch_error(shard_url, what))
    except DataError as e:
        if opened:  # the manifest check itself
            raise
        if expected is not None:
            raise mismatch_error(shard_url, f"cannot be read: {e}") from None
        stats.skip(shard_url, "<shard>", f"shard missing or unreadable ({e})")
        return
    except TarError as e:
        if expected is not None:
            raise mismatch_error(shard_url, str(e)) from None
        if current is not None and e.member is not None and _split_name(e.member)[0] != current.key:
            yield current  # all its members were read before the cut
            current = None
        where = current.key if current else (_split_name(e.member)[0] if e.member else "<end of shard>")
        stats.skip(shard_url, where, f"unreadable shard ({e})")
        return
    except Exception as e:  # truncated or corrupt gzip, a network error mid-stream
        if expected is not None:
            raise mismatch_error(shard_url, f"unreadable: {type(e).__name__}: {e}") from None
        stats.skip(shard_url, current.key if current else "<shard>", f"unreadable shard ({type(e).__name__}: {e})")
        return
    if current is not None:
        yield current


def iter_verified_samples(shard_url: str, stats: SkipStats, suffixes: frozenset[str],
                          expected: ShardDigest) -> Iterator[RawSample]:
    """Training's read of a shard its manifest lists: its samples only once all of it matched the manifest's
    size and sha256; otherwise (missing, truncated, rewritten while read) none, and one counted skip saying
    what did not match."""
    try:
        held = list(iter_raw_samples(shard_url, stats, suffixes, expected))
    except DataError as e:
        stats.skip(shard_url, "<shard>", f"whole shard not used ({e})")
        return
    yield from held


def parse_label(sample: RawSample) -> int:
    raw = sample.members.get("cls")
    if raw is None:
        raise SampleError("missing .cls member")
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise SampleError(f"bad .cls member {raw[:20]!r}") from e


def label_problem(label: int, num_classes: int | None) -> str | None:
    """Why `label` cannot train or certify a model with `num_classes` classes (None: any label >= 0), or None.
    The one label check of every data path: the loaders' streams and certification's `check_sample`."""
    if label < 0:
        return f"label {label} is negative"
    if num_classes is not None and label >= num_classes:
        return f"label {label} is outside the model's {num_classes} classes (0..{num_classes - 1})"
    return None


def image_bytes(sample: RawSample) -> bytes:
    for ext in IMAGE_SUFFIXES:
        if ext in sample.members:
            return sample.members[ext]
    raise SampleError("missing image member (.jpg/.png)")


def decode_raw(sample: RawSample, num_classes: int | None = None):
    """(RGB PIL image, label) or SampleError; a label outside 0..num_classes-1 is one."""
    if sample.problem is not None:
        raise SampleError(sample.problem)
    label = parse_label(sample)
    if (problem := label_problem(label, num_classes)) is not None:
        raise SampleError(problem)
    return decode_image(image_bytes(sample)), label
