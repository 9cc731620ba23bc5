"""The training-checkpoint format: file names, per-rank manifests, validation and discovery (no DeepSpeed here).

A checkpoint is a directory `{run}/step_XXXXXXXX/` (any fsspec URL) written by every rank:
  rank-RRRRR.safetensors    this rank's tensors: its fp32 master partitions (`fp32/<param>`), its
                            partitions of the per-element optimizer state (`optim/<key>/<param>`) and its
                            RNG state (no pickle anywhere)
  rank-RRRRR.json           this rank's non-tensor state (optimizer scalars, data position)
  manifold-rank-RRRRR.safetensors  the manifold optimizer state of the matrices this rank owns
                            (`{key}/{parameter name}`: moments, Lookahead slow copy); meta.json's
                            `manifold_owners` says which rank's file holds each matrix
  meta.json                 (rank 0) step, world size, parameter shapes, resolved config
  manifest-rank-RRRRR.json  sha256 + size of this rank's files, written last
A checkpoint is valid only when the manifests of all `world_size` ranks exist and every file matches
its hash: a half-uploaded, truncated or scribbled-over checkpoint is invisible to resume, which falls
back to the previous one with a warning. Format version 1 (all manifold state in rank 0's tensor file)
is still read.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lipnext_scale.ckpt.layout import STEP_DIR as _STEP_DIR
from lipnext_scale.ckpt.layout import step_dir_name as checkpoint_dir_name
from lipnext_scale.errors import LipnextError
from lipnext_scale.storage import (
    Digest, atomic_write_bytes, digest, exists, is_file, join_url, json_bytes, list_dir, parse_json, read_bytes,
    verify_digest, write_json,
)

log = logging.getLogger(__name__)

FORMAT = "lipnext-train-checkpoint"
FORMAT_VERSION = 2  # 2: manifold state per owner rank (1: all of it in rank 0's tensor file)
META_FILE = "meta.json"


class CheckpointError(LipnextError, ValueError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and what to do."""


def rank_tensor_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def rank_json_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def manifold_file(rank: int) -> str:
    return f"manifold-rank-{rank:05d}.safetensors"


def manifest_file(rank: int) -> str:
    return f"manifest-rank-{rank:05d}.json"


def tensor_blob(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})


def write_rank_files(dir_url: str, rank: int, tensors: dict[str, torch.Tensor], extra: dict[str, Any],
                     meta: dict[str, Any] | None = None, manifold: dict[str, torch.Tensor] | None = None) -> None:
    """Write this rank's files and, last, its manifest (each file atomically). `meta` is given by rank 0
    only; `manifold` is the state of the manifold matrices this rank owns (`{key}/{name}` -> tensor)."""
    blobs = {
        rank_tensor_file(rank): tensor_blob(tensors),
        rank_json_file(rank): json_bytes(extra, indent=None, sort_keys=True),
    }
    if manifold is not None:
        blobs[manifold_file(rank)] = tensor_blob(manifold)
    if meta is not None:
        blobs[META_FILE] = json_bytes({"format": FORMAT, "format_version": FORMAT_VERSION, **meta}, sort_keys=True)
    for name, data in blobs.items():
        atomic_write_bytes(join_url(dir_url, name), data, CheckpointError)
    manifest = {name: {"sha256": d.sha256, "bytes": d.bytes} for name, d in
                ((name, digest(data)) for name, data in blobs.items())}
    write_json(join_url(dir_url, manifest_file(rank)), manifest, CheckpointError)


# --------------------------------------------------------------------------------------------------
# Reading and validating.


def _read(url: str, name: str) -> bytes:
    """One file of a checkpoint, read with the storage layer's retries (a flaky object store while resuming or
    certifying costs retries, not the run); a missing file means an incomplete checkpoint."""
    data = read_bytes(join_url(url, name), CheckpointError, missing_ok=True)
    if data is None:
        raise CheckpointError(f"checkpoint {url!r} lacks {name}: it is incomplete (interrupted upload?); "
                              "resume from an earlier checkpoint")
    return data


def _parse_json(data: bytes, where: str) -> Any:
    """JSON of a checkpoint file; anything unparsable (not UTF-8, zero-filled, truncated) is corruption."""
    return parse_json(data, where, "the checkpoint is corrupt; use an earlier checkpoint", CheckpointError)


def _check_manifest(entries: Any, where: str) -> dict[str, dict]:
    ok = isinstance(entries, dict) and all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
        for v in entries.values())
    if not ok:
        raise CheckpointError(f"{where}: expected {{file: {{sha256, bytes}}}}: the checkpoint is corrupt; "
                              "use an earlier checkpoint")
    return entries


class VerifiedReader:
    """Reads a checkpoint's files, each checked against its rank's manifest before it is parsed."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.expected: dict[str, dict] = {}
        self._load_manifest(0)
        meta = _parse_json(self.read(META_FILE), f"{self.url}/{META_FILE}")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{self.url}/{META_FILE}: not a {FORMAT} (format={got!r})")
        version = meta.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{self.url}: format version {version!r} is newer than this library "
                                  f"supports ({FORMAT_VERSION}); upgrade lipnext_scale")
        if not isinstance(meta.get("world_size"), int) or meta["world_size"] < 1 or not isinstance(
                meta.get("step"), int) or not isinstance(meta.get("param_shapes"), dict):
            raise CheckpointError(f"{self.url}/{META_FILE}: lacks a valid step, world_size or param_shapes; "
                                  "the checkpoint is corrupt")
        self.meta: dict[str, Any] = meta
        for r in range(1, meta["world_size"]):
            self._load_manifest(r)

    def _load_manifest(self, rank: int) -> None:
        where = f"{self.url}/{manifest_file(rank)}"
        self.expected.update(_check_manifest(_parse_json(_read(self.url, manifest_file(rank)), where), where))

    def read(self, name: str) -> bytes:
        if name not in self.expected:
            raise CheckpointError(f"{self.url}: {name} is not listed in any manifest; the checkpoint is corrupt")
        data = _read(self.url, name)
        want = self.expected[name]
        verify_digest(digest(data), Digest(want["bytes"], want["sha256"]), lambda what: CheckpointError(
            f"{self.url}/{name} is corrupt ({what}); use an earlier checkpoint"))
        return data

    def verify_all(self) -> None:
        for name in sorted(self.expected):
            self.read(name)

    def rank_tensors(self, rank: int) -> dict[str, torch.Tensor]:
        return load_safetensors(self.read(rank_tensor_file(rank)))

    def rank_extra(self, rank: int) -> dict[str, Any]:
        return _parse_json(self.read(rank_json_file(rank)), f"{self.url}/{rank_json_file(rank)}")

    def rank_manifold(self, rank: int) -> dict[str, torch.Tensor]:
        return load_safetensors(self.read(manifold_file(rank)))


def read_meta(url: str) -> dict[str, Any]:
    """A checkpoint's meta.json, checked against rank 0's manifest (the other files are not read)."""
    return VerifiedReader(url).meta


def validate_checkpoint(url: str) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return its meta. Raises CheckpointError."""
    reader = VerifiedReader(url)
    reader.verify_all()
    return reader.meta


# --------------------------------------------------------------------------------------------------
# Discovery: a run directory holds `step_XXXXXXXX` checkpoints.


def list_checkpoints(run_url: str) -> list[tuple[int, str]]:
    """(step, url) of every `step_XXXXXXXX` directory under the run, oldest first (valid or not)."""
    out = []
    for entry in list_dir(run_url, CheckpointError, missing_ok=True):
        m = _STEP_DIR.match(entry.name)
        if m:
            out.append((int(m.group(1)), join_url(run_url, m.group(0))))
    return sorted(out)


def find_latest_valid(run_url: str, after_step: int = -1) -> str | None:
    """The newest checkpoint of a run (with a step > `after_step`) that validates; corrupt or incomplete
    ones, whatever is wrong with them, are skipped with a warning."""
    for step, url in reversed(list_checkpoints(run_url)):
        if step <= after_step:
            break
        try:
            validate_checkpoint(url)
            return url
        except CheckpointError as e:
            log.warning("skipping checkpoint at step %d: %s", step, e)
    return None


def is_checkpoint(url: str) -> bool:
    return is_file(join_url(url, META_FILE), CheckpointError) or is_file(join_url(url, manifest_file(0)),
                                                                         CheckpointError)


def resolve_checkpoint(url: str) -> str:
    """The training checkpoint a user means by `url`: the checkpoint itself, or for a run directory its
    newest `step_*` checkpoint (never an older one: a corrupt newest one fails when it is read, rather
    than silently giving older weights). `lipnext export` and `lipnext certify` both resolve with this."""
    if not exists(url, CheckpointError):
        raise CheckpointError(f"checkpoint {url!r} does not exist; pass a training checkpoint (a step_* "
                              "directory), a run directory or a `lipnext export` output")
    if is_checkpoint(url):
        return url.rstrip("/")
    steps = list_checkpoints(url)
    if not steps:
        raise CheckpointError(f"{url!r} is neither an exported model (no manifest.json) nor a training "
                              f"checkpoint (no {META_FILE}, no step_* directories); pass one of those")
    return steps[-1][1]
