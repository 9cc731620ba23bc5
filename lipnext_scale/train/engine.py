"""Build the training engine: model, optimizer and DeepSpeed config sections -> a ZeRO-3 engine + the manifold step.

    ds = deepspeed_config(base_json, cfg.train, cfg.data, cfg.optim, world_size)
    built = build_engine(cfg.model, cfg.optim, cfg.loss, ds, seed=cfg.train.seed)
    loss, logits = built.engine(images, labels, eps); built.engine.backward(loss)
    built.manifold.step(); built.engine.step()

The model is built inside `deepspeed.zero.Init`, so a 2B model is never whole on one rank. It is built
and initialised in fp32 (QR has no bf16 kernel, and bf16-rounded matrices are not orthogonal); for bf16
the module partitions are then cast and the fp32 masters get the exact fp32 values back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lipnext_scale.config import ConfigError, DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig
from lipnext_scale.train.loss import certified_loss


def deepspeed_config(base: dict[str, Any], train: TrainConfig, data: DataConfig, optim: OptimConfig,
                     world_size: int, ranks_per_node: int | None = None) -> dict[str, Any]:
    """The engine config: ZeRO settings from the JSON file, everything the job config owns set from it
    (so batch, accumulation, clipping and precision have one source of truth), and ZeRO++'s hierarchical
    partition resolved for the cluster's shape (`ranks_per_node`: ranks on one node; None: one node)."""
    out = copy.deepcopy(base)
    zero = out.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3:
        raise ConfigError(f"train.deepspeed={train.deepspeed!r}: zero_optimization.stage must be 3 "
                          f"(got {zero.get('stage')!r}); the manifold step works on ZeRO-3 partitions")
    if "zero_hpz_partition_size" in zero:
        zero["zero_hpz_partition_size"] = hpz_partition_size(zero["zero_hpz_partition_size"], world_size,
                                                             ranks_per_node, train.deepspeed)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler", "fp16"):
        out.pop(key, None)
    out["train_micro_batch_size_per_gpu"] = data.batch_size
    out["gradient_accumulation_steps"] = train.grad_accum
    out["train_batch_size"] = data.batch_size * train.grad_accum * world_size
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


def hpz_partition_size(setting: int | str, world_size: int, ranks_per_node: int | None, where: str) -> int:
    """ZeRO++ hierarchical partitioning (hpZ) keeps a secondary copy of the bf16 weights inside each node, so
    the per-layer all-gathers stay on the node's links. "auto" = the ranks of one node, and 1 (off) on a
    single node, where the primary partition is already node-local. DeepSpeed groups consecutive ranks,
    which Ray Train places node by node."""
    node = ranks_per_node or world_size
    size = node if setting == "auto" else setting
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"train.deepspeed={where!r}: zero_hpz_partition_size={setting!r}; use \"auto\" "
                          "(the GPUs of one node) or a positive integer")
    if node >= world_size:
        return 1
    if world_size % size or node % size:
        raise ConfigError(f"train.deepspeed={where!r}: zero_hpz_partition_size={size} does not divide the "
                          f"{world_size} ranks ({node} per node); use \"auto\" or a divisor of {node}")
    return size


@dataclass
class Built:
    """What the loop trains with."""

    engine: Any  # deepspeed.DeepSpeedEngine wrapping an Objective
    model: nn.Module  # the LipNeXt inside it (ZeRO-3 partitioned)
    manifold: Any  # lipnext_scale.optim.ShardedManifoldStep
    dtype: torch.dtype  # of the module partitions and the inputs
    # The matrices an input passes through, with repeats (R twice per block): the monitoring bound's product.
    lipschitz_shapes: list[tuple[int, int]]


def init_distributed(device: str) -> None:
    import deepspeed

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
