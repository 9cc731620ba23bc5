"""`lipnext plan`: what one GPU holds when a LipNeXt trains under DeepSpeed ZeRO-3 with our manifold optimizer.

Arithmetic only (no GPU, no DeepSpeed): the model's sizes from the registry, ZeRO-3's partitioning (every
tensor split over N ranks, ceil(numel / N) elements each), the manifold state by owner (each matrix has
one owner rank: `optim.assign_owners`, and its rounds: `optim.sharded.plan_rounds`, what training uses) and
the activations our block saves for backward. Per GPU, in bytes, held all the time:

  parameters          the bf16 (or fp32) working copy, partitioned: e * P / N
  fp32 masters        DeepSpeed's fp32 copy of the partition: 4 P / N (bf16 only; fp32 trains on it directly)
  gradients           the fp32 gradient partition: 4 P / N
  reduce bucket       ZeRO-3's contiguous gradient bucket: e * reduce_bucket_size (allocated once)
  euclidean state     the client optimizer's two Adam moments on every parameter: 8 P / N (DeepSpeed's
                      flat groups hold them for the lr-0 manifold group too; `ds_to_universal` needs them),
                      + 4 P / N for the Lookahead copy when optim.euclid_lookahead_k > 0
  manifold state      the owned matrices' fp32 state (Adam moments, Lookahead slow copy and update sum)
  runtime             CUDA context, allocator slack and communication buffers: a fixed allowance (on CPU
                      ranks, `--device cpu`: the measured resident size of a rank before its model,
                      CPU_RUNTIME_BYTES)

and, at different times of a step (the peak is the larger of the two phases):

  forward/backward    live parameters: ZeRO-3's gathered working set (the block being computed and the
                      prefetch bucket); activations: what autograd keeps per block for one micro-batch (the
                      block input after the positional add and the shift output, e bytes each per element,
                      the beta-Abs sign mask, 1 byte for half the channels, and the fused C x C product M R^T)
  manifold step       manifold gather: the owner's round of whole fp32 matrices (up to optim.manifold_bucket_mb,
                      at least one matrix) with their gradients, the next round's gather in flight and the
                      last round's new values going back (`_manifold_step_peaks`); manifold update: the
                      update's fp32 workspace on the round (stacked copies of matrices, gradients and state,
                      FastExp and polish temporaries, the new state): MANIFOLD_UPDATE_WORKSPACE x the round

Every kind is for the rank whose total is largest (ranks differ only in their manifold share). The fit check
keeps 10 % of the device free for fragmentation. `lipnext plan MODEL --gpus N --gpu-mem GB --micro-batch B`
prints the breakdown, the manifold state by owner rank, the global batch and the smallest GPU count that
fits; bench/bench_scale.py measures CPU ranks against it (tests/unit/test_plan.py: within 20 %).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from lipnext_scale.errors import LipnextError

GIB = 2 ** 30
HEADROOM = 0.9  # use at most 90 % of the device
RUNTIME_BYTES = int(1.5 * GIB)  # CUDA context + NCCL buffers + allocator slack (typical for one H100 rank)
# A CPU rank's resident size before its model: Python, torch, DeepSpeed (CPU accelerator), the Ray worker and
# gloo. Measured by bench/bench_scale.py (peak RSS of a lipnext-tiny ZeRO-3 rank: 0.56 GiB, scale.json).
CPU_RUNTIME_BYTES = int(0.56 * GIB)
# Peak fp32 temporaries of `optim.update.manifold_update` per fp32 element of the round it updates (fast_exp,
# Adam moments, Lookahead, polish; square 4096 x 4096 matrices, stacked as the owner does): 21.3-24.1 measured
# for rounds of 4 and 1 matrices by bench/bench_scale.py (scale.json, "manifold_update_workspace").
MANIFOLD_UPDATE_WORKSPACE = 21.5


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed settings that change memory (configs/deepspeed/*.json)."""
    prefetch_bucket_size: int = 50_000_000  # elements
    reduce_bucket_size: int = 50_000_000  # elements
    precision: str = "bf16"  # bf16: bf16 parameters and fp32 masters (zero3_bf16.json); fp32: fp32 only


def _partition(numel: int, world: int) -> int:
    return -(-numel // world)


def memory_plan(model: str, gpus: int, micro_batch: int, *, optim_cfg=None, zero: ZeroSettings = ZeroSettings(),
                grad_accum: int = 1, runtime_bytes: int = RUNTIME_BYTES, **model_overrides) -> dict:
    """Per-GPU bytes by kind for `model` on `gpus` data-parallel ZeRO-3 ranks at `micro_batch` images per GPU
    (`zero.precision`: bf16 or fp32)."""
    from lipnext_scale.config import OptimConfig
    from lipnext_scale.model import get_spec
    from lipnext_scale.optim import assign_owners, state_shapes

    if gpus < 1 or micro_batch < 1:
        raise ValueError(f"gpus={gpus}, micro_batch={micro_batch}: both must be >= 1")
    cfg = optim_cfg or OptimConfig()
    precision = zero.precision
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
    steps = _manifold_step_peaks(matrices, owners, gpus, int(cfg.manifold_bucket_mb * 2 ** 20 / 4))
    block_params = 2 * C * C + T + C
    common = {
        "parameters": e * part,
        "fp32_masters": 4 * part if precision == "bf16" else 0,
        "gradients": 4 * part,
        "reduce_bucket": e * zero.reduce_bucket_size,  # contiguous_gradients: allocated once, kept
        "euclidean_state": (8 + (4 if cfg.euclid_lookahead_k > 0 else 0)) * part,
        "live_parameters": e * (2 * block_params + zero.prefetch_bucket_size),
        "activations": micro_batch * (L * (2 * e + 0.5) * T * C + 4 * 3 * spec.image_size ** 2) + L * e * C * C,
        "runtime": runtime_bytes,
    }
    per_rank = []
    for r in range(gpus):
        in_flight, round_numel = steps[r]
        kinds = {**common, "manifold_state": 4 * owned[r], "manifold_gather": 4 * in_flight,
                 "manifold_update": 4 * MANIFOLD_UPDATE_WORKSPACE * round_numel}
        per_rank.append({k: int(v) for k, v in kinds.items()})
    busiest = max(range(gpus), key=lambda r: _total(per_rank[r]))
    out = per_rank[busiest]
    return {"model": model, "params": P, "gpus": gpus, "micro_batch": micro_batch, "precision": precision,
            "global_batch": micro_batch * gpus * grad_accum, "bytes": out, "total_bytes": _total(out),
            "phases": _phases(out), "busiest_rank": busiest,
            "largest_matrix_elements": max(math.prod(s) for s in matrices.values()),
            "manifold_owned_elements_by_rank_max": max(owned),
            "manifold_state_bytes_by_rank": [4 * n for n in owned]}


FORWARD_BACKWARD = ("live_parameters", "activations")
MANIFOLD_STEP = ("manifold_gather", "manifold_update")


def _phases(kinds: dict[str, int]) -> dict[str, int]:
    return {"forward_backward": sum(kinds[k] for k in FORWARD_BACKWARD),
            "manifold_step": sum(kinds[k] for k in MANIFOLD_STEP)}


def _total(kinds: dict[str, int]) -> int:
    """What a rank holds at its peak: everything persistent plus the larger of the two phases."""
    persistent = sum(v for k, v in kinds.items() if k not in FORWARD_BACKWARD + MANIFOLD_STEP)
    return persistent + max(_phases(kinds).values())


def _manifold_step_peaks(matrices: dict[str, tuple[int, int]], owners: dict[str, int], world: int,
                         bucket_numel: int) -> list[tuple[int, int]]:
    """Per rank, at the round where it holds most: (fp32 elements of whole matrices and exchange buffers held,
    elements of the round it updates). Rounds are packed as training packs them (`plan_rounds`); while an
    owner updates round j it holds round j's matrices and gradients, round j+1's gather in flight (its sends:
    its slices of every owner's matrices; its receives: its own matrices' slices from everyone) and round
    j-1's new matrices going back (sends and receives alike)."""
    from types import SimpleNamespace

    from lipnext_scale.optim.sharded import plan_rounds

    slots = [SimpleNamespace(name=n, owner=owners[n], numel=math.prod(s)) for n, s in matrices.items()]
    rounds = plan_rounds(slots, world, bucket_numel)
    own = [[sum(s.numel for s in rs if s.owner == r) for rs in rounds] for r in range(world)]
    every = [sum(s.numel for s in rs) for rs in rounds]

    def at(values: list[int], j: int) -> int:
        return values[j] if 0 <= j < len(values) else 0

    peaks = []
    for r in range(world):
        held = [(2 * own[r][j] + 2 * at(own[r], j + 1) + 2 * at(every, j + 1) // world + at(own[r], j - 1)
                 + at(every, j - 1) // world, own[r][j]) for j in range(len(rounds))]
        peaks.append(max(held, key=lambda h: h[0] + MANIFOLD_UPDATE_WORKSPACE * h[1], default=(0, 0)))
    return peaks


def smallest_gpu_count(model: str, gpu_mem_gb: float, micro_batch: int, *, max_gpus: int = 4096, **kw) -> int | None:
    """The fewest GPUs of `gpu_mem_gb` on which one rank's plan fits in HEADROOM of the device, or None."""
    limit = gpu_mem_gb * GIB * HEADROOM
    n = 1
    while n <= max_gpus:
        plan = memory_plan(model, n, micro_batch, **kw)
        if plan["total_bytes"] <= limit:
            return n
        # Not shrinking with more GPUs: the runtime, forward/backward, a manifold step on one whole matrix.
        one_matrix = 4 * (5 + MANIFOLD_UPDATE_WORKSPACE) * plan["largest_matrix_elements"]
        fixed = plan["bytes"]["runtime"] + max(plan["phases"]["forward_backward"], one_matrix)
        if fixed > limit:
            return None  # a smaller micro-batch (or optim.manifold_bucket_mb) is needed
        n += 1 if n < 8 else 8  # past one node, whole nodes of 8
    return None


def format_plan(plan: dict, gpu_mem_gb: float | None = None) -> str:
    rows = [f"{plan['model']}: {plan['params'] / 1e9:.3f}B parameters, {plan['gpus']} GPU(s), micro-batch "
            f"{plan['micro_batch']} (global batch {plan['global_batch']}), {plan['precision']}"]
    for kind, value in plan["bytes"].items():
        rows.append(f"  {kind:<17} {value / GIB:8.2f} GiB")
    phases = ", ".join(f"{k.replace('_', '/', 1) if k == 'forward_backward' else k.replace('_', ' ')} "
                       f"{v / GIB:.2f}" for k, v in plan["phases"].items())
    rows.append(f"  {'peak phase':<17} the larger of: {phases} GiB")
    rows.append(f"  {'total per GPU':<17} {plan['total_bytes'] / GIB:8.2f} GiB (rank {plan['busiest_rank']})")
    if gpu_mem_gb is not None:
        fits = plan["total_bytes"] <= gpu_mem_gb * GIB * HEADROOM
        rows.append(f"  {'fits':<17} {'yes' if fits else 'no'} ({gpu_mem_gb:g} GiB device, {HEADROOM:.0%} usable)")
    return "\n".join(rows)


def format_owners(plan: dict, shown: int = 8) -> str:
    """The manifold state each owner rank holds (the first `shown` ranks, then the range of the rest)."""
    by_rank = [b / GIB for b in plan["manifold_state_bytes_by_rank"]]
    head = ", ".join(f"rank {r} {b:.2f}" for r, b in enumerate(by_rank[:shown]))
    rest = f", ranks {shown}-{len(by_rank) - 1} {min(by_rank[shown:]):.2f}-{max(by_rank[shown:]):.2f}" \
        if len(by_rank) > shown else ""
    return f"  manifold state by owner (GiB): {head}{rest}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registered model (lipnext info lists them), e.g. lipnext-2b")
    p.add_argument("--gpus", type=int, required=True, help="data-parallel ZeRO-3 ranks (one per GPU)")
    p.add_argument("--gpu-mem", type=float, required=True, metavar="GB", help="memory of one GPU in GiB, e.g. 80")
    p.add_argument("--micro-batch", type=int, required=True, help="images per GPU per forward pass")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (global batch)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--depth", type=int, help="override the model's depth (blocks)")
    p.add_argument("--width", type=int, help="override the model's width (channels)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: CPU ranks (runtime = CPU_RUNTIME_BYTES instead of the CUDA allowance)")
    p.add_argument("--config", help="a job TOML whose [optim] section the run uses (manifold state, Lookahead, "
                                    "manifold_bucket_mb); default: OptimConfig's defaults")


def run_plan(args: argparse.Namespace) -> int:
    from lipnext_scale.model import list_models

    bad = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("gpus", "micro_batch", "grad_accum", "depth",
                                                                    "width") if getattr(args, k) is not None
           and getattr(args, k) < 1]
    if not args.gpu_mem > 0 or not math.isfinite(args.gpu_mem):
        bad.append(f"--gpu-mem {args.gpu_mem}")
    if bad:
        raise LipnextError(f"{', '.join(bad)}: counts must be >= 1 and --gpu-mem a positive number of GiB")
    if args.model not in list_models():
        raise LipnextError(f"unknown model {args.model!r}; choose one of {', '.join(list_models())}")
    overrides = {k: getattr(args, k) for k in ("depth", "width") if getattr(args, k) is not None}
    kw = dict(zero=ZeroSettings(precision=args.precision), grad_accum=args.grad_accum,
              runtime_bytes=CPU_RUNTIME_BYTES if args.device == "cpu" else RUNTIME_BYTES, **overrides)
    if args.config:
        from lipnext_scale.config import load_config

        kw["optim_cfg"] = load_config(args.config).optim  # a bad file: ConfigError
    try:
        plan = memory_plan(args.model, args.gpus, args.micro_batch, **kw)
        fewest = smallest_gpu_count(args.model, args.gpu_mem, args.micro_batch, **kw)
    except (KeyError, TypeError, ValueError) as e:  # the registry's and the spec's checks of the overrides
        raise LipnextError(f"{args.model} {overrides or ''}: {e.args[0] if e.args else e}") from None
    print(format_plan(plan, args.gpu_mem))
    print(format_owners(plan))
    print(f"  global batch      {plan['global_batch']} = {args.gpus} GPUs x micro-batch {args.micro_batch} x "
          f"{args.grad_accum} accumulation steps")
    print(f"  smallest fit      {fewest} GPU(s) of {args.gpu_mem:g} GiB at micro-batch {args.micro_batch}" if fewest
          else f"  smallest fit      none: the per-GPU part that does not shrink with more GPUs exceeds "
               f"{args.gpu_mem:g} GiB; lower --micro-batch")
    return 0
