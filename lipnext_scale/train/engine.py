"""Build the training engine: model, optimizer and DeepSpeed config sections -> a ZeRO-3 engine + the manifold step.

    ds = deepspeed_config(base_json, cfg.train, cfg.batch_plan(world_size), cfg.optim, world_size)
    built = build_engine(cfg.model, cfg.optim, cfg.loss, ds, seed=cfg.train.seed)
    loss, logits = built.engine(images, labels, eps); built.engine.backward(loss)
    built.manifold.step(); built.engine.step()

The model is built inside `deepspeed.zero.Init`, so a 2B model is never whole on one rank. It is built
and initialised in fp32 (QR has no bf16 kernel, and bf16-rounded matrices are not orthogonal); for bf16
the module partitions are then cast and the fp32 masters get the exact fp32 values back.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lipnext_scale.config import BatchPlan, ConfigError, LossConfig, ModelConfig, OptimConfig, TrainConfig
from lipnext_scale.train.loss import certified_loss


def deepspeed_config(base: dict[str, Any], train: TrainConfig, plan: BatchPlan, optim: OptimConfig,
                     world_size: int, node_of_rank: list[int] | None = None) -> dict[str, Any]:
    """The engine config: ZeRO settings from the JSON file, everything the job owns set from it (batch and
    accumulation from this world size's `plan`, clipping and precision from the config, so each has one
    source of truth), and ZeRO++'s hierarchical partition resolved for the cluster's shape (`node_of_rank`:
    the node index of each world rank, in rank order; None: one node). `world_size` is an int: an elastic
    range is resolved per size by the caller."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise TypeError(f"deepspeed_config: world_size must be a positive int, got {world_size!r} (resolve "
                        "train.num_workers' range with TrainConfig.worker_range first)")
    if plan.micro * plan.accumulation * world_size != plan.global_batch:
        raise ValueError(f"deepspeed_config: {plan} is not a plan for {world_size} ranks (make it with "
                         "JobConfig.batch_plan(world_size))")
    out = copy.deepcopy(base)
    zero = out.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3:
        raise ConfigError(f"train.deepspeed={train.deepspeed!r}: zero_optimization.stage must be 3 "
                          f"(got {zero.get('stage')!r}); the manifold step works on ZeRO-3 partitions")
    if "zero_hpz_partition_size" in zero:
        nodes = node_of_rank if node_of_rank is not None else [0] * world_size
        if len(nodes) != world_size:
            raise ValueError(f"deepspeed_config: {len(nodes)} node indices for {world_size} ranks")
        zero["zero_hpz_partition_size"] = hpz_partition_size(zero["zero_hpz_partition_size"], nodes,
                                                             train.deepspeed).size
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler", "fp16"):
        out.pop(key, None)
    out["train_micro_batch_size_per_gpu"] = plan.micro
    out["gradient_accumulation_steps"] = plan.accumulation
    out["train_batch_size"] = plan.global_batch
    # Clips the Euclidean group; the manifold step clips its own gradients (they are zeroed before).
    out["gradient_clipping"] = optim.grad_clip
    out["bf16"] = {**out.get("bf16", {}), "enabled": train.precision == "bf16"}
    out["zero_allow_untested_optimizer"] = True  # our client optimizer (AdamW + manifold groups)
    out.setdefault("steps_per_print", 10 ** 9)
    return out


class Objective(nn.Module):
    """model + certified-training loss in one forward, so DeepSpeed gathers the head rows the loss reads.
    `eps` (the ramped training radius, a float set by the loop each step) is an argument, not state."""

    def __init__(self, model: nn.Module, loss_cfg: LossConfig):
        super().__init__()
        self.model, self.loss_cfg = model, loss_cfg
        model.check_finite = False  # no host sync per micro-batch; the loop checks the loss on sync steps

    def forward(self, images: torch.Tensor, labels: torch.Tensor, eps: float):
        logits = self.model(images)
        return certified_loss(logits, labels, self.model.head.rows(), eps, self.loss_cfg), logits


@dataclass(frozen=True)
class HpzChoice:
    """The hpZ partition size for one cluster shape, and why (logged by the loop at every (re)start)."""

    size: int
    reason: str


def ranks_per_node(node_of_rank: list[int]) -> list[int]:
    """Ranks on each node, in order of first appearance."""
    counts: dict[int, int] = {}
    for node in node_of_rank:
        counts[node] = counts.get(node, 0) + 1
    return list(counts.values())


def hpz_partition_size(setting: int | str, node_of_rank: list[int], where: str) -> HpzChoice:
    """ZeRO++ hierarchical partitioning (hpZ) keeps a secondary copy of the bf16 weights inside groups of
    `size` consecutive ranks, so the per-layer all-gathers stay on a node's links. DeepSpeed needs one size on
    every rank that divides the world size, and a group is only node-local if no group straddles two nodes.

    "auto": the gcd of the ranks per node when ranks are grouped by node (Ray Train numbers them node by
    node): equal nodes give the node size; uneven nodes (e.g. 8, 8, 4 after GPUs were lost) the largest size
    every node divides into, so each group still lies inside one node; 1 (hpZ off) on one node, where the
    primary partition is already node-local, when the gcd is 1, or when the ranks of a node are not
    consecutive. An integer is used as given when it fits the shape; when it does not (an elastic run that
    lost a node), the "auto" choice is used instead and the reason says so, rather than failing the restart.
    """
    if not (setting == "auto" or (isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1)):
        raise ConfigError(f"train.deepspeed={where!r}: zero_hpz_partition_size={setting!r}; use \"auto\" "
                          "(the GPUs of one node) or a positive integer")
    per_node = ranks_per_node(node_of_rank)
    shape = f"{len(node_of_rank)} ranks on {len(per_node)} node(s), ranks per node {per_node}"
    if len(per_node) <= 1:
        return HpzChoice(1, f"hpZ off: {shape} (one node: the primary partition is already node-local)")
    runs = 1 + sum(a != b for a, b in zip(node_of_rank, node_of_rank[1:]))
    if runs != len(per_node):
        return HpzChoice(1, f"hpZ off: {shape}, ranks of a node not consecutive (a group would straddle nodes)")
    common = math.gcd(*per_node)
    if setting != "auto":
        if common % setting == 0:
            return HpzChoice(setting, f"hpZ partition {setting} (zero_hpz_partition_size={setting}): {shape}")
        prefix = f"zero_hpz_partition_size={setting} does not divide every node's ranks; using auto: "
    else:
        prefix = ""
    if common == 1:
        return HpzChoice(1, f"{prefix}hpZ off: {shape} (no group size > 1 divides every node's ranks)")
    uneven = " (uneven: the largest size dividing every node's ranks)" if len(set(per_node)) > 1 else ""
    return HpzChoice(common, f"{prefix}hpZ partition {common}: {shape}{uneven}")


@dataclass
class Built:
    """What the loop trains with."""

    engine: Any  # deepspeed.DeepSpeedEngine wrapping an Objective
    model: nn.Module  # the LipNeXt inside it (ZeRO-3 partitioned)
    manifold: Any  # lipnext_scale.optim.ShardedManifoldStep
    dtype: torch.dtype  # of the module partitions and the inputs
    # The matrices an input passes through, with repeats (R twice per block): the monitoring bound's product.
    lipschitz_shapes: list[tuple[int, int]]


def never_preempted() -> bool:
    return False


@dataclass(frozen=True)
class WorkerRuntime:
    """One training process's place in the job, handed in by whoever started it (Ray Train's context, a test):
    its rank among `world`, its torch device, its node's index (gathered from every rank, the cluster's shape
    that sizes ZeRO++'s hierarchical partition) and the platform's preemption notice (`preempted()`, asked on
    log steps). Facts of the running job, not settings (those are the JobConfig)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    node: int = 0
    preempted: Callable[[], bool] = never_preempted


def gather_node_of_rank(node: int, world: int) -> list[int]:
    """Every rank's node index, in rank order (one all-gather at start; [node] alone in one process)."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [node] * world
    out = [None] * world
    dist.all_gather_object(out, int(node))
    return [int(n) for n in out]


def init_distributed(device: str) -> None:
    """DeepSpeed's process group on this rank (nccl on CUDA, gloo on CPU), without DeepSpeed's shared-memory
    inference all-reduce kernel.

    On the CPU accelerator, DeepSpeed's communication backend JIT-compiles that kernel (`deepspeed_shm_comm`, C++
    against torch's headers) at start unless TORCH_EXTENSIONS_DIR already holds it: ~50 core-s of g++ on a fresh
    machine (26 s on 2 cores here), and every rank starting meanwhile waits on the build lock. Only DeepSpeed's
    inference (`inference_all_reduce`) uses it; ZeRO-3 training reduces through torch.distributed. DeepSpeed reads
    one module-level op-compatibility dict to decide, and keeps edits to it, so the kernel is marked unavailable
    there (no DeepSpeed option does this)."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    shm_kernel = get_accelerator().get_op_builder("ShareMemCommBuilder")  # None where the accelerator has none
    if shm_kernel is not None:
        deepspeed.ops.__compatible_ops__[shm_kernel.NAME] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo")


def _cast_module_partitions(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast the ZeRO-3 module partitions of a model built under zero.Init in fp32 to `dtype` (before
    `deepspeed.initialize`); return the exact fp32 partitions for `_set_fp32_masters` afterwards."""
    exact = {}
    for name, p in model.named_parameters():
        exact[name] = p.ds_tensor.detach().float().clone()
        if dtype != torch.float32:
            p.ds_tensor.data = p.ds_tensor.data.to(dtype)
            p.data = p.data.to(dtype)
    return exact


def _set_fp32_masters(model: nn.Module, partitions: dict[str, torch.Tensor]) -> None:
    """Write this rank's fp32 master partitions (the engine created them from the cast module copy)."""
    from deepspeed.utils import safe_set_local_fp32_param

    for name, p in model.named_parameters():
        safe_set_local_fp32_param(p, partitions[name])


def build_engine(model_cfg: ModelConfig, optim_cfg: OptimConfig, loss_cfg: LossConfig, ds_config: dict[str, Any],
                 *, seed: int) -> Built:
    """The ZeRO-3 engine (client optimizer: NAdam/AdamW on the Euclidean parameters) and the manifold step
    of the orthogonal matrices; `ds_config` from `deepspeed_config` (its bf16 flag sets the precision).
    Call `init_distributed` first; every rank calls this."""
    import deepspeed

    from lipnext_scale.model import create_model
    from lipnext_scale.optim import ShardedManifoldStep, build_zero3_optimizers

    torch.manual_seed(seed)  # identical initial weights on every rank (zero.Init also broadcasts)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    with deepspeed.zero.Init(config_dict_or_path={**ds_config, "bf16": {"enabled": False}}):
        model = create_model(model_cfg.name, num_classes=model_cfg.num_classes, image_size=model_cfg.image_size,
                             **model_cfg.overrides())
    # Each block is one ZeRO-3 leaf: its parameters are fetched once at the block's entry, and no hooks
    # run on its parameterless sub-modules (shift, beta-Abs).
    from deepspeed.utils import set_z3_leaf_modules

    from lipnext_scale.model.layers import LipNeXtBlock

    set_z3_leaf_modules(model, [LipNeXtBlock])
    exact_init = _cast_module_partitions(model, dtype)
    objective = Objective(model, loss_cfg)
    deepspeed.zero.register_external_parameter(objective, model.head.direction)
    client_opt, _ = build_zero3_optimizers(model, optim_cfg)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=client_opt, config=ds_config)
    _set_fp32_masters(model, exact_init)
    del exact_init
    manifold = ShardedManifoldStep(engine, model, optim_cfg)
    slot_shapes = {s.name: tuple(s.shape) for s in manifold.slots}
    return Built(engine, model, manifold, dtype, [slot_shapes[name] for name in model.lipschitz_path()])
