"""`lipnext plan`: what one GPU holds when a LipNeXt trains under DeepSpeed ZeRO-3 with our manifold optimizer.

Arithmetic only (no GPU, no DeepSpeed): the model's sizes from the registry, ZeRO-3's partitioning (every
tensor split over N ranks, ceil(numel / N) elements each), the manifold state by owner (each matrix has
one owner rank: `optim.assign_owners`, the same assignment training uses) and the activations our block
saves for backward. Per GPU, in bytes:

  parameters          the bf16 (or fp32) working copy, partitioned: e * P / N
  fp32 masters        DeepSpeed's fp32 copy of the partition: 4 P / N (bf16 only; fp32 trains on it directly)
  gradients           the fp32 gradient partition: 4 P / N
  euclidean state     the client optimizer's two Adam moments on every parameter: 8 P / N (DeepSpeed's
                      flat groups hold them for the lr-0 manifold group too; `ds_to_universal` needs them)
  manifold state      the owned matrices' fp32 state (Adam moments, Lookahead slow copy and update sum):
                      the largest owner's share, not the average
  manifold gather     one bucket of whole fp32 matrices the owner gathers per round (optim.manifold_bucket_mb)
                      plus its gradient, at least one matrix
  live parameters     ZeRO-3's gathered working set: the block being computed and the prefetch bucket
  activations         what autograd keeps per block for one micro-batch: the block input after the
                      positional add and the shift output (e bytes each per element), the beta-Abs sign mask
                      (1 byte for half the channels), and the fused C x C product M R^T
  runtime             CUDA context, allocator slack and communication buffers: a fixed allowance

The fit check keeps 10 % of the device free for fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2 ** 30
HEADROOM = 0.9  # use at most 90 % of the device
RUNTIME_BYTES = int(1.5 * GIB)  # CUDA context + NCCL buffers + allocator slack (typical for one H100 rank)


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed settings that change memory (configs/deepspeed/*.json)."""
    prefetch_bucket_size: int = 50_000_000  # elements
    reduce_bucket_size: int = 50_000_000  # elements


def _partition(numel: int, world: int) -> int:
    return -(-numel // world)


def memory_plan(model: str, gpus: int, micro_batch: int, *, precision: str = "bf16", optim_cfg=None,
                zero: ZeroSettings = ZeroSettings(), grad_accum: int = 1, runtime_bytes: int = RUNTIME_BYTES,
                **model_overrides) -> dict:
    """Per-GPU bytes by kind for `model` on `gpus` data-parallel ZeRO-3 ranks at `micro_batch` images per GPU."""
    from lipnext_scale.config import OptimConfig
    from lipnext_scale.model import get_spec
    from lipnext_scale.optim import assign_owners, state_shapes

    if gpus < 1 or micro_batch < 1:
        raise ValueError(f"gpus={gpus}, micro_batch={micro_batch}: both must be >= 1")
    cfg = optim_cfg or OptimConfig()
    spec = get_spec(model, **model_overrides)
    e = 2 if precision == "bf16" else 4
    C, T, L = spec.width, spec.tokens, spec.depth
    matrices = {"stem.weight": (spec.stem_in, C)} if spec.stem_in != C else {"stem.weight": (C, C)}
    for i in range(L):
        matrices[f"blocks.{i}.rot"] = (C, C)
        matrices[f"blocks.{i}.mix"] = (C, C)
    P = spec.num_params()
    tensors = [math.prod(s) for s in matrices.values()]
    tensors += [T] * L + [C] * L + [C * spec.num_classes, spec.num_classes]  # pos, biases, head
    part = sum(_partition(n, gpus) for n in tensors)  # ZeRO pads every tensor's partition
    owners = assign_owners(matrices, gpus)
    owned = [0] * gpus
    for name, shape in matrices.items():
        owned[owners[name]] += sum(math.prod(s) for s in state_shapes(shape, cfg).values())
    largest = max(math.prod(s) for s in matrices.values())
    bucket = max(int(cfg.manifold_bucket_mb * 2 ** 20 / 4), largest)
    block_params = 2 * C * C + T + C
    out = {
        "parameters": e * part,
        "fp32_masters": 4 * part if precision == "bf16" else 0,
        "gradients": 4 * part,
        "euclidean_state": 8 * part,
        "manifold_state": 4 * max(owned),
        "manifold_gather": 2 * 4 * min(bucket, sum(math.prod(s) for s in matrices.values())),
        "live_parameters": e * (2 * block_params + zero.prefetch_bucket_size),
        "activations": micro_batch * (L * (2 * e + 0.5) * T * C + 4 * 3 * spec.image_size ** 2) + L * e * C * C,
        "runtime": runtime_bytes,
    }
    out = {k: int(v) for k, v in out.items()}
    return {"model": model, "params": P, "gpus": gpus, "micro_batch": micro_batch, "precision": precision,
            "global_batch": micro_batch * gpus * grad_accum, "bytes": out, "total_bytes": sum(out.values()),
            "manifold_owned_elements_by_rank_max": max(owned)}


def smallest_gpu_count(model: str, gpu_mem_gb: float, micro_batch: int, *, max_gpus: int = 4096, **kw) -> int | None:
    """The fewest GPUs of `gpu_mem_gb` on which one rank's plan fits in HEADROOM of the device, or None."""
    limit = gpu_mem_gb * GIB * HEADROOM
    n = 1
    while n <= max_gpus:
        plan = memory_plan(model, n, micro_batch, **kw)
        if plan["total_bytes"] <= limit:
            return n
        fixed = sum(plan["bytes"][k] for k in ("activations", "runtime", "live_parameters", "manifold_gather"))
        if fixed > limit:
            return None  # these do not shrink with more GPUs: a smaller micro-batch is needed
        n += 1 if n < 8 else 8  # past one node, whole nodes of 8
    return None


def format_plan(plan: dict, gpu_mem_gb: float | None = None) -> str:
    rows = [f"{plan['model']}: {plan['params'] / 1e9:.3f}B parameters, {plan['gpus']} GPU(s), micro-batch "
            f"{plan['micro_batch']} (global batch {plan['global_batch']}), {plan['precision']}"]
    for kind, value in plan["bytes"].items():
        rows.append(f"  {kind:<17} {value / GIB:8.2f} GiB")
    rows.append(f"  {'total per GPU':<17} {plan['total_bytes'] / GIB:8.2f} GiB")
    if gpu_mem_gb is not None:
        fits = plan["total_bytes"] <= gpu_mem_gb * GIB * HEADROOM
        rows.append(f"  {'fits':<17} {'yes' if fits else 'no'} ({gpu_mem_gb:g} GiB device, {HEADROOM:.0%} usable)")
    return "\n".join(rows)
