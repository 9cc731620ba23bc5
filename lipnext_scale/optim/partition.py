"""ZeRO-3 partition arithmetic, the one copy: the manifold step (`sharded.py`) and checkpoints (`ckpt/`) use it.

DeepSpeed ZeRO-3 cuts each parameter's flattened values into `world_size` equal chunks of
ceil(numel / world_size) elements (the last one zero-padded), rank r holding chunk r
(`param.ds_tensor`). So the full tensor is the rank-ordered concatenation, trimmed and reshaped, and
re-partitioning for another world size slices it again: all that elastic resume needs, and it works for
optimizer state exactly as for weights. Hand-written because DeepSpeed keeps this inside its partitioner
(`_aligned_size` / `_partition_param`) with no public function for a tensor that is not a live parameter.
"""

from __future__ import annotations

import math

import torch


def partition_size(numel: int, world_size: int) -> int:
    """Elements per rank (padding included) of a parameter of `numel` elements."""
    return math.ceil(numel / world_size)


def partition_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the flat elements rank `rank` holds for real (stop - start < size on a padded rank)."""
    size = partition_size(numel, world_size)
    return min(rank * size, numel), min((rank + 1) * size, numel)


def partition_of(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 partition of a full tensor (flat, zero-padded at the end; a view when unpadded)."""
    flat = full.reshape(-1)
    size = partition_size(flat.numel(), world_size)
    piece = flat[rank * size:(rank + 1) * size]
    if piece.numel() < size:
        piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
    return piece


def join_partitions(parts: list[torch.Tensor], shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Rank-ordered ZeRO-3 partitions -> the full tensor of `shape` (padding dropped)."""
    numel = math.prod(shape)
    return torch.cat([p.reshape(-1) for p in parts])[:numel].reshape(shape)
