"""Reading a checkpoint's state at any world size: full tensors (export, certify, tests) or one new rank's
ZeRO-3 partitions (resume), and the manifold optimizer state of the matrices a rank owns now.

Pure tensor bookkeeping over `format.VerifiedReader` and the shared partition arithmetic
(`optim/partition.py`); no DeepSpeed here (`zero.py` moves the result into an engine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lipnext_scale.ckpt.format import CheckpointError, VerifiedReader
from lipnext_scale.optim.partition import partition_range, partition_size


@dataclass
class TrainState:
    """A checkpoint's contents, world-size independent: full tensors, or one rank's partitions of them."""

    step: int
    world_size: int  # the world size the checkpoint was written at
    params: dict[str, torch.Tensor]  # name -> fp32 tensor (full, or the requested partition, flat)
    optim: dict[str, dict[str, torch.Tensor]]  # state key (exp_avg, ...) -> name -> tensor, like params
    optim_scalars: dict[str, Any]  # e.g. {"step": 12.0}: identical on all ranks
    manifold: dict[str, torch.Tensor]  # format 1 only: heavy-ball buffers kept in rank 0's tensor file
    manifold_extra: dict[str, Any]  # the manifold optimizer's scalars (step, skipped steps, format)
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
    return (*partition_range(numel, rank, world), partition_size(numel, world))


def load_train_state(url: str, partition: tuple[int, int] | None = None) -> TrainState:
    """Validate and read a checkpoint, joining the old ranks' partitions.

    partition=None: full tensors (consolidation, export, tests). partition=(rank, world_size): only that
    rank's ZeRO-3 partitions for the new world size, read from the old ranks that overlap it one file at
    a time, so a resume never holds the whole model's state (rank 0's file is always read: it holds the
    data position).
    """
    reader = VerifiedReader(url)
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


def manifold_tensors(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """An optimizer's per-matrix state ({name: {key: tensor}}) flattened for a file: `{key}/{name}`."""
    return {f"{k}/{n}": v.detach() for n, e in state.items() for k, v in e.items()}


def load_manifold_state(url: str, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The manifold optimizer state of the matrices `names` (those this rank owns now, at any world size):
    {name: {key: tensor}}, read from the files of the ranks that owned them when it was written (and only
    those), each checked against its manifest. Version-1 checkpoints: heavy-ball buffers from rank 0's file."""
    reader = VerifiedReader(url)
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
