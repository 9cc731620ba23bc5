"""Training checkpoints: format, validation, discovery and consolidation (no DeepSpeed or Ray here).

A checkpoint is a directory `{run}/step_XXXXXXXX/` (any fsspec URL) written by every rank:
  rank-RRRRR.safetensors    this rank's tensors: its fp32 master partitions (`fp32/<param>`), its
                            partitions of the per-element optimizer state (`optim/<key>/<param>`), the
                            manifold optimizer's state and RNG state (no pickle anywhere)
  rank-RRRRR.json           this rank's non-tensor state (optimizer scalars, data position)
  manifold-rank-RRRRR.safetensors  the manifold optimizer state of the matrices this rank owns
                            (`{key}/{parameter name}`: moments, Lookahead slow copy); meta.json's
                            `manifold_owners` says which rank's file holds each matrix
  meta.json                 (rank 0) step, world size, parameter shapes, resolved config
  manifest-rank-RRRRR.json  sha256 + size of this rank's files, written last
A checkpoint is valid only when the manifests of all `world_size` ranks exist and every file matches
its hash: a half-uploaded or truncated checkpoint is invisible to resume, which falls back to the
previous one with a warning.

ZeRO-3 partitions each parameter's flattened values into `world_size` equal chunks of
ceil(numel / world_size) (the last one padded), rank r holding chunk r. So the full tensor is the
rank-ordered concatenation, trimmed and reshaped; re-partitioning for another world size slices it
again. That is all elastic resume needs, and it works for optimizer state exactly as for weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lipnext_scale.storage import url_to_fs

log = logging.getLogger(__name__)

FORMAT = "lipnext-train-checkpoint"
FORMAT_VERSION = 2  # 2: manifold state per owner rank (1: all of it in rank 0's tensor file)
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and what to do."""


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_tensor_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def rank_json_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def manifold_file(rank: int) -> str:
    return f"manifold-rank-{rank:05d}.safetensors"


def manifest_file(rank: int) -> str:
    return f"manifest-rank-{rank:05d}.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_local_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Writing one rank's part (into a local directory that Ray Train then uploads to storage).


def _tensor_blob(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})


def write_rank_files(local_dir: str, rank: int, tensors: dict[str, torch.Tensor], extra: dict[str, Any],
                     meta: dict[str, Any] | None = None, manifold: dict[str, torch.Tensor] | None = None) -> None:
    """Write this rank's files and, last, its manifest. `meta` is given by rank 0 only; `manifold` is the
    state of the manifold matrices this rank owns (`{key}/{name}` -> tensor)."""
    os.makedirs(local_dir, exist_ok=True)
    blobs = {
        rank_tensor_file(rank): _tensor_blob(tensors),
        rank_json_file(rank): json.dumps(extra, sort_keys=True).encode(),
    }
    if manifold is not None:
        blobs[manifold_file(rank)] = _tensor_blob(manifold)
    if meta is not None:
        blobs[META_FILE] = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **meta},
                                      indent=2, sort_keys=True).encode()
    for name, data in blobs.items():
        _atomic_local_write(os.path.join(local_dir, name), data)
    manifest = {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in blobs.items()}
    _atomic_local_write(os.path.join(local_dir, manifest_file(rank)), json.dumps(manifest, indent=2).encode())


# --------------------------------------------------------------------------------------------------
# Reading and validating.


def _fs(url: str):
    return url_to_fs(url, CheckpointError)


def _read(url: str, name: str) -> bytes:
    fs, path = _fs(url)
    full = posixpath.join(path, name)
    try:
        with fs.open(full, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {url!r} lacks {name}: it is incomplete (interrupted upload?); "
                              "resume from an earlier checkpoint") from None


def _read_json(url: str, name: str) -> Any:
    try:
        return json.loads(_read(url, name))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{url}/{name} is not valid JSON ({e}): the checkpoint is corrupt") from None


class _VerifiedReader:
    """Reads a checkpoint's files, each checked against its rank's manifest before it is parsed."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.expected: dict[str, dict] = {}
        self._load_manifest(0)
        self.meta = json.loads(self.read(META_FILE))
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.url}/{META_FILE}: not a {FORMAT} (format={self.meta.get('format')!r})")
        if self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{self.url}: format version {self.meta['format_version']} is newer than this "
                                  f"library supports ({FORMAT_VERSION}); upgrade lipnext_scale")
        for r in range(1, int(self.meta["world_size"])):
            self._load_manifest(r)

    def _load_manifest(self, rank: int) -> None:
        entries = _read_json(self.url, manifest_file(rank))
        if not isinstance(entries, dict):
            raise CheckpointError(f"{self.url}/{manifest_file(rank)}: expected a JSON object")
        self.expected.update(entries)

    def read(self, name: str) -> bytes:
        if name not in self.expected:
            raise CheckpointError(f"{self.url}: {name} is not listed in any manifest; the checkpoint is corrupt")
        data = _read(self.url, name)
        want = self.expected[name]
        if len(data) != want["bytes"] or _sha256(data) != want["sha256"]:
            raise CheckpointError(
                f"{self.url}/{name} is corrupt: {len(data)} bytes, sha256 {_sha256(data)[:12]}..., manifest "
                f"says {want['bytes']} bytes, {want['sha256'][:12]}...; use an earlier checkpoint")
        return data

    def verify_all(self) -> None:
        for name in sorted(self.expected):
            self.read(name)

    def rank_tensors(self, rank: int) -> dict[str, torch.Tensor]:
        return load_safetensors(self.read(rank_tensor_file(rank)))

    def rank_extra(self, rank: int) -> dict[str, Any]:
        return json.loads(self.read(rank_json_file(rank)))

    def rank_manifold(self, rank: int) -> dict[str, torch.Tensor]:
        return load_safetensors(self.read(manifold_file(rank)))


def validate_checkpoint(url: str) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return its meta. Raises CheckpointError."""
    reader = _VerifiedReader(url)
    reader.verify_all()
    return reader.meta


def list_checkpoints(run_url: str) -> list[tuple[int, str]]:
    """(step, url) of every `step_XXXXXXXX` directory under the run, oldest first (valid or not)."""
    fs, path = _fs(run_url)
    if not fs.exists(path):
        return []
    out = []
    for entry in fs.ls(path, detail=False):
        m = _STEP_DIR.match(posixpath.basename(entry.rstrip("/")))
        if m:
            out.append((int(m.group(1)), f"{run_url.rstrip('/')}/{m.group(0)}"))
    return sorted(out)


def find_latest_valid(run_url: str) -> str | None:
    """The newest checkpoint of a run that validates; corrupt or incomplete ones are skipped with a warning."""
    for step, url in reversed(list_checkpoints(run_url)):
        try:
            validate_checkpoint(url)
            return url
        except CheckpointError as e:
            log.warning("skipping checkpoint at step %d: %s", step, e)
    return None


# --------------------------------------------------------------------------------------------------
# Consolidation and re-partitioning (pure tensor bookkeeping).


def partition_size(numel: int, world_size: int) -> int:
    return math.ceil(numel / world_size)


def join_partitions(parts: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    """Rank-ordered ZeRO-3 partitions -> the full tensor (padding dropped)."""
    numel = math.prod(shape)
    return torch.cat([p.reshape(-1) for p in parts])[:numel].reshape(shape)


def partition_of(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 partition of a full tensor (zero-padded at the end)."""
    flat = full.reshape(-1)
    size = partition_size(flat.numel(), world_size)
    start = rank * size
    piece = flat[start:start + size]
    if piece.numel() < size:
        piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
    return piece


@dataclass
class TrainState:
    """A checkpoint's contents, world-size independent: full tensors, or one rank's partitions of them."""

    step: int
    world_size: int  # the world size the checkpoint was written at
    params: dict[str, torch.Tensor]  # name -> fp32 tensor (full, or the requested partition, flat)
    optim: dict[str, dict[str, torch.Tensor]]  # state key (exp_avg, ...) -> name -> tensor, like params
    optim_scalars: dict[str, Any]  # e.g. {"step": 12.0}: identical on all ranks
    manifold: dict[str, torch.Tensor]  # the manifold optimizer's world-size-independent state
    manifold_extra: dict[str, Any]
    data: dict[str, Any]  # data position of rank 0 (epoch, batches consumed, seeds)
    rng: dict[int, torch.Tensor]  # old rank -> torch CPU RNG state, for the ranks that were read
    config: dict[str, Any]
    meta: dict[str, Any]
    partition: tuple[int, int] | None = None  # (rank, world_size) the tensors were cut for, None: full


def _target_range(numel: int, partition: tuple[int, int] | None) -> tuple[int, int, int]:
    """(start, stop, buffer size) of the flat elements wanted: all of them, or one ZeRO-3 partition."""
    if partition is None:
        return 0, numel, numel
    rank, world = partition
    size = partition_size(numel, world)
    return min(rank * size, numel), min((rank + 1) * size, numel), size


def load_train_state(url: str, partition: tuple[int, int] | None = None) -> TrainState:
    """Validate and read a checkpoint, joining the old ranks' partitions.

    partition=None: full tensors (consolidation, export, tests). partition=(rank, world_size): only that
    rank's ZeRO-3 partitions for the new world size, read from the old ranks that overlap it one file at
    a time, so a resume never holds the whole model's state (rank 0's file is always read: it holds the
    manifold momentum and the data position).
    """
    reader = _VerifiedReader(url)
    meta = reader.meta
    old_world = int(meta["world_size"])
    shapes: dict[str, list[int]] = meta["param_shapes"]
    keys = ["fp32", *[f"optim/{k}" for k in meta.get("optim_state_keys", [])]]
    targets = {n: _target_range(math.prod(s), partition) for n, s in shapes.items()}
    needed = {0}
    for n, (lo, hi, _) in targets.items():
        old_size = partition_size(math.prod(shapes[n]), old_world)
        if hi > lo:
            needed.update(range(lo // old_size, (hi - 1) // old_size + 1))
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
    manifold: dict[str, torch.Tensor] = {}
    manifold_extra: dict[str, Any] = {}
    rng: dict[int, torch.Tensor] = {}
    extra0: dict[str, Any] = {}
    for old_rank in sorted(needed):
        tensors, extra = reader.rank_tensors(old_rank), reader.rank_extra(old_rank)
        if old_rank == 0:
            extra0 = extra
        manifold.update({k[len("manifold/"):]: v for k, v in tensors.items() if k.startswith("manifold/")})
        manifold_extra.update(extra.get("manifold", {}))
        if "rng/torch" in tensors:
            rng[old_rank] = tensors["rng/torch"]
        for n, (lo, hi, size) in targets.items():
            old_size = partition_size(math.prod(shapes[n]), old_world)
            a, b = max(lo, old_rank * old_size), min(hi, (old_rank + 1) * old_size)
            for key in keys:
                src = tensors.get(f"{key}/{n}")
                if src is None:
                    continue  # e.g. no optimizer state for manifold matrices
                buf = out[key].setdefault(n, torch.zeros(size, dtype=src.dtype))
                if b > a:
                    buf[a - lo:b - lo] = src.reshape(-1)[a - old_rank * old_size:b - old_rank * old_size]
        del tensors
    if partition is None:
        out = {k: {n: t.reshape(shapes[n]) for n, t in d.items()} for k, d in out.items()}
    return TrainState(step=int(meta["step"]), world_size=old_world, params=out["fp32"],
                      optim={k[len("optim/"):]: d for k, d in out.items() if k != "fp32" and d},
                      optim_scalars=extra0.get("optim_scalars", {}), manifold=manifold,
                      manifold_extra=manifold_extra, data=extra0.get("data", {}), rng=rng,
                      config=meta.get("config", {}), meta=meta, partition=partition)


def load_manifold_state(url: str, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The manifold optimizer state of the matrices `names` (those this rank owns now, at any world size):
    {name: {key: tensor}}, read from the files of the ranks that owned them when it was written (and only
    those), each checked against its manifest. Version-1 checkpoints: heavy-ball buffers from rank 0's file."""
    reader = _VerifiedReader(url)
    owners = reader.meta.get("manifold_owners")
    out: dict[str, dict[str, torch.Tensor]] = {}
    if owners is None:  # format 1
        for k, v in reader.rank_tensors(0).items():
            if k.startswith("manifold/") and k[len("manifold/"):] in names:
                out[k[len("manifold/"):]] = {"momentum_buffer": v}
        return out
    unknown = sorted(set(names) - set(owners))
    if unknown:
        raise CheckpointError(f"{url}: no manifold optimizer state for {unknown[:5]}: the checkpoint was written "
                              "for another model; resume with the model it was trained with")
    wanted = set(names)
    for old_rank in sorted({owners[n] for n in names}):
        for k, v in reader.rank_manifold(old_rank).items():
            key, _, name = k.partition("/")
            if name in wanted:
                out.setdefault(name, {})[key] = v
    return out


def consolidate_checkpoint(ckpt_url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full fp32 state_dict, resolved job config dict) of a training checkpoint at any world size."""
    state = load_train_state(ckpt_url)
    return state.params, state.config
