"""Manifold optimizer (paper.md A "Optimizer", B.5): FastExp rotations driven by Adam-type (or heavy-ball)
moments on orthogonal matrices, periodic exact polar, Manifold Lookahead; NAdam/AdamW (+ Lookahead) on the rest.

Single process: `ManifoldOptimizer(model, cfg)`. DeepSpeed ZeRO-3: `build_zero3_optimizers` before
`deepspeed.initialize`, then `ShardedManifoldStep(engine, model, cfg).step()` between `engine.backward`
and `engine.step` (see `sharded.py`; DeepSpeed is imported only there, inside functions). ZeRO-3's partition
arithmetic (`partition.py`) is shared with the checkpoint code (`lipnext_scale.ckpt`).
"""

from lipnext_scale.optim.fast_exp import (
    ERROR_TARGETS, FASTEXP_THRESHOLDS, branch_names, choose_branch, drain_fast_exp_stats, fast_exp,
    fast_exp_error_bound, ns_polish, polar_exact, remainder_bound, stiefel_exp_action, taylor_order,
)
from lipnext_scale.optim.manifold import (
    ManifoldParameterError, check_manifold_parameter, orthogonality_error, project_tangent, riemannian_grad,
    riemannian_momentum_step, sym, tangent_skew_error,
)
from lipnext_scale.optim.update import StepAt, manifold_update, state_shapes
from lipnext_scale.optim.optimizer import STATE_FORMAT, ManifoldOptimizer, split_parameters
from lipnext_scale.optim.retraction import (
    RETRACTIONS, orthogonalize_exact, polar_newton_schulz, retract, retract_polar_ns,
)
from lipnext_scale.optim.partition import join_partitions, partition_of, partition_size
from lipnext_scale.optim.schedule import lr_multiplier
from lipnext_scale.optim.sharded import ShardedManifoldStep, assign_owners, build_zero3_optimizers

__all__ = [
    "ERROR_TARGETS", "FASTEXP_THRESHOLDS", "ManifoldOptimizer", "ManifoldParameterError", "RETRACTIONS", "STATE_FORMAT",
    "ShardedManifoldStep", "StepAt", "assign_owners", "branch_names", "build_zero3_optimizers",
    "check_manifold_parameter", "choose_branch",
    "drain_fast_exp_stats", "fast_exp",
    "fast_exp_error_bound", "join_partitions", "lr_multiplier", "manifold_update", "ns_polish",
    "orthogonality_error", "orthogonalize_exact", "partition_of", "partition_size", "polar_exact",
    "polar_newton_schulz", "project_tangent", "remainder_bound", "retract", "retract_polar_ns", "riemannian_grad",
    "riemannian_momentum_step", "split_parameters", "state_shapes", "stiefel_exp_action", "sym",
    "tangent_skew_error", "taylor_order",
]
