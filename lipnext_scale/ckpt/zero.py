"""Move training state between a DeepSpeed ZeRO-3 engine and checkpoint tensors (thin distributed glue).

Saved per rank: the fp32 master partition of every parameter, this rank's partition of every
per-element optimizer state (AdamW/NAdam moments of the Euclidean parameters; the manifold group has
none), the optimizer's scalar state, the RNG state. Restored from `load_train_state(url, partition=
(rank, world))`, which re-partitions for the current world size, so the same code resumes at the same
or a different world size. DeepSpeed is imported inside the functions only.

The ZeRO-3 trap: the fp32 master is what counts. Values written to the module's (bf16) partition are
overwritten from the master at the next `engine.step()`, and values written to the master reach the
module partition only then; a resume therefore writes both, so the first forward after resume already
sees the restored weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lipnext_scale.ckpt.format import CheckpointError
from lipnext_scale.ckpt.state import TrainState


def _flat_group_of(engine, param) -> torch.Tensor:
    opt = engine.optimizer
    group_idx = opt.grad_position[opt.get_param_id(param)][0]
    return opt.fp32_partitioned_groups_flat[group_idx]


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    return engine.optimizer.optimizer


def param_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}


def collect_local_state(engine, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """(tensors, scalars, optimizer state keys) of this rank: CPU copies of its partitions, keyed by name."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    inner = _inner_optimizer(engine)
    tensors: dict[str, torch.Tensor] = {}
    keys: set[str] = set()
    scalars: dict[str, float] = {}
    for name, p in model.named_parameters():
        tensors[f"fp32/{name}"] = safe_get_local_fp32_param(p).detach().float().reshape(-1).to("cpu", copy=True)
        state = inner.state.get(_flat_group_of(engine, p), {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.numel() > 1:
                local = safe_get_local_optimizer_state(p, key)
                tensors[f"optim/{key}/{name}"] = local.detach().reshape(-1).to("cpu", copy=True)
                keys.add(key)
            else:  # e.g. AdamW's `step`: one value per flat group, equal for all groups that stepped
                scalars[key] = float(value)
    tensors["rng/torch"] = torch.get_rng_state()
    return tensors, scalars, sorted(keys)


def _ensure_optimizer_state(engine, model: nn.Module, state: TrainState) -> None:
    """Create the optimizer's state entries (they appear lazily at the first step) for the flat groups that
    had state when the checkpoint was written, so the per-parameter partitions can be written into them."""
    inner = _inner_optimizer(engine)
    named = dict(model.named_parameters())
    for key, per_param in state.optim.items():
        for name in per_param:
            flat = _flat_group_of(engine, named[name])
            entry = inner.state.setdefault(flat, {})
            if key not in entry:
                entry[key] = torch.zeros_like(flat)
            for skey, value in state.optim_scalars.items():
                if skey not in entry:
                    entry[skey] = torch.tensor(value, dtype=torch.float32)


def restore_local_state(engine, model: nn.Module, state: TrainState) -> None:
    """Write a checkpoint state cut for this rank into the engine: fp32 masters and module partitions,
    optimizer state, RNG (same world size only)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    rank, world_size = state.partition
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(state.params))
    extra = sorted(set(state.params) - set(named))
    if missing or extra:
        raise CheckpointError(f"checkpoint parameters do not match the model: missing {missing[:5]}, unexpected "
                              f"{extra[:5]}; resume with the model settings the checkpoint was trained with")
    shapes = state.meta["param_shapes"]
    for name, p in named.items():
        if list(shapes[name]) != list(p.ds_shape):
            raise CheckpointError(f"checkpoint {name} has shape {tuple(shapes[name])}, the model "
                                  f"{tuple(p.ds_shape)}; resume with the model the checkpoint was trained with")
        local = state.params[name].float().to(p.ds_tensor.device)
        safe_set_local_fp32_param(p, local)
        p.ds_tensor.data.copy_(local.to(p.ds_tensor.dtype))  # the module copy, see the module docstring
    _ensure_optimizer_state(engine, model, state)
    for key, per_param in state.optim.items():
        for name, local in per_param.items():
            safe_set_local_optimizer_state(named[name], local.float(), key)
    inner = _inner_optimizer(engine)
    for entry in inner.state.values():
        for skey, value in state.optim_scalars.items():
            if skey in entry:
                entry[skey] = torch.tensor(value, dtype=entry[skey].dtype if torch.is_tensor(entry[skey]) else None)
    if state.world_size == world_size and rank in state.rng:
        torch.set_rng_state(state.rng[rank])
