"""Manifold optimizer: Riemannian momentum on orthogonal matrices, AdamW on the rest (paper.md B.8).

Single process: `ManifoldOptimizer(model, cfg)`. DeepSpeed ZeRO-3: `build_zero3_optimizers` before
`deepspeed.initialize`, then `ShardedManifoldStep(engine, model, cfg).step()` between `engine.backward`
and `engine.step` (see `sharded.py`; DeepSpeed is imported only there, inside functions).
"""

from lipnext_scale.optim.manifold import (
    ManifoldParameterError, check_manifold_parameter, orthogonality_error, project_tangent, riemannian_grad,
    riemannian_momentum_step, sym, tangent_skew_error,
)
from lipnext_scale.optim.optimizer import STATE_FORMAT, ManifoldOptimizer, split_parameters
from lipnext_scale.optim.retraction import (
    RETRACTIONS, orthogonalize_exact, polar_newton_schulz, retract, retract_cayley, retract_exp,
    retract_polar_ns, retract_qr,
)
from lipnext_scale.optim.schedule import lr_multiplier
from lipnext_scale.optim.sharded import ShardedManifoldStep, assign_owners, build_zero3_optimizers

__all__ = [
    "ManifoldOptimizer", "ManifoldParameterError", "RETRACTIONS", "STATE_FORMAT", "ShardedManifoldStep",
    "assign_owners", "build_zero3_optimizers", "check_manifold_parameter", "lr_multiplier",
    "orthogonality_error", "orthogonalize_exact", "polar_newton_schulz", "project_tangent", "retract",
    "retract_cayley", "retract_exp", "retract_polar_ns", "retract_qr", "riemannian_grad",
    "riemannian_momentum_step", "split_parameters", "sym", "tangent_skew_error",
]
