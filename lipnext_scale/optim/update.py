"""The update of a batch of same-shape orthogonal matrices: one pure function shared by the single-process
optimizer and the ZeRO-3 owner ranks, so both compute the same numbers from the same inputs.

fast_exp (paper.md A, [K]):
  gradient      the Riemannian gradient in the Lie algebra: square X: Gamma = skew(X^T G) (p x p, body frame);
                tall X: R = G - X sym(X^T G) = X Gamma + (I - X X^T) G (= X Gamma when square)
  direction     adam: Adam moments of Gamma (or R), D = m_hat / (sqrt(v_hat) + eps) (elementwise, so a skew
                Gamma gives a skew D); momentum: D = m <- mu m + Gamma (or R)
  generator     square: A = -lr D, X <- X FastExp(A); tall: Omega = -lr/2 (D X^T - X D^T),
                X <- FastExp(Omega) X by its low-rank action; with D = R, Omega X = -lr/2 (G - X G^T X), half the
                canonical-metric gradient step, and for a square X the two rules coincide
  Why moments of the Riemannian and not of the Euclidean gradient ([K] does the latter): the Euclidean
  gradient keeps a large normal part at a critical point, and Adam's elementwise scaling of it leaves
  skew(X^T (G / sqrt(v))) != 0 there, so Euclidean-moment Adam settles away from the optimum (it misses the
  Procrustes solution by O(1) in tests/unit/test_optim_optimizer.py); these moments vanish at critical points.
  normalised    optim.normalize_step (ablation): D scaled per matrix to ||D||_F = sqrt(p), so ||A||_F = lr sqrt(p)
  rotation      in optim.rotation_dtype (float64: the first author's choice; the result is rounded to fp32)
  polish        one Newton-Schulz step every optim.polish_every steps (0: never); a square matrix's is skipped on a
                Lookahead step, whose result (the polished slow copy) does not depend on it
  lookahead     every k steps, and at a requested synchronisation (before evaluations and checkpoints). Square: slow <- slow FastExp(1/2 sum of the k generators A), as in the paper.
                Tall: the k generators live in the n x n algebra (rank 2pk), so the slow copy moves half way
                to the fast one instead (the same first-order move): FastExp(1/2 (D S^T - S D^T)) S with
                D = Delta - S S^T Delta / 2, Delta = F - S, so Omega S = Delta / 2 to first order; then fast <- slow
  polar         every polar_every steps, exact fp64 polar of X (and of the slow copy)
polar_ns (the ablation): Riemannian heavy-ball + Newton-Schulz polar (`riemannian_momentum_step`).

Tensors are stacked (b, rows, cols) in the parameter's orientation (a wide co-isometry is worked on as its
transpose); per-matrix state keys: exp_avg, exp_avg_sq | momentum_buffer, slow, delta_sum (p x p, square).
Math in fp32 (fp64 stays fp64), polar in fp64. No host read: FastExp's branches are chosen on the device, and
its branch counts and norms go to `stats` as device tensors (read at log steps, `drain_fast_exp_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lipnext_scale.optim.fast_exp import fast_exp, ns_polish, polar_exact, stiefel_exp_action
from lipnext_scale.optim.manifold import riemannian_momentum_step


def state_shapes(shape: tuple[int, int], cfg) -> dict[str, tuple[int, ...]]:
    """The optimizer-state tensors one matrix of `shape` has under `cfg`, with their shapes."""
    if cfg.retraction == "polar_ns":
        return {"momentum_buffer": shape}
    out = ({"exp_avg": shape, "exp_avg_sq": shape} if cfg.moments == "adam" else {"momentum_buffer": shape})
    if cfg.lookahead_k > 0:
        out["slow"] = shape
        if shape[0] == shape[1]:
            out["delta_sum"] = shape
    return out


def _due(step: int, every: int) -> bool:
    return every > 0 and (step + 1) % every == 0


def _direction(g: torch.Tensor, state: dict, step: int, cfg) -> torch.Tensor:
    if cfg.moments == "momentum":
        buf = state.get("momentum_buffer")
        buf = g.clone() if buf is None else buf.mul_(cfg.momentum).add_(g)
        state["momentum_buffer"] = buf
        return buf
    b1, b2 = cfg.manifold_betas
    m = state.setdefault("exp_avg", torch.zeros_like(g))
    v = state.setdefault("exp_avg_sq", torch.zeros_like(g))
    m.lerp_(g, 1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    t = step + 1
    return (m / (1.0 - b1 ** t)) / ((v / (1.0 - b2 ** t)).sqrt_().add_(cfg.manifold_eps))


def _normalized(d: torch.Tensor, cfg) -> torch.Tensor:
    """optim.normalize_step: the direction rescaled per matrix to Frobenius norm sqrt(p) (p the smaller side),
    so the generator's norm is lr sqrt(p) whatever the gradients (the first author's later LLM code); else d."""
    if not cfg.normalize_step:
        return d
    p = min(d.shape[-2:])
    return d * (p ** 0.5 / torch.linalg.matrix_norm(d).clamp_min(1e-30))[..., None, None]


def _branching(cfg, stats: dict | None = None) -> dict:
    """FastExp's branch rule and squarings from the optimizer config, and the optimizer's current squaring budget
    (`stats["fast_exp_budget"]`, set at log steps by `next_squaring_budget`; see fast_exp.py)."""
    budget = stats.get("fast_exp_budget") if stats is not None else None
    return {"rule": cfg.fast_exp_rule, "squarings": cfg.fast_exp_squarings, "budget": budget}


def _t(x: torch.Tensor, wide: bool) -> torch.Tensor:
    return x.mT if wide else x


@dataclass(frozen=True)
class StepAt:
    """Where the optimizer is: step `step` (0-based) at learning rate `lr`; `sync_lookahead`: this step ends
    with the Lookahead update whether or not k steps have passed (slow and fast weights synchronised before an
    evaluation or a checkpoint, as timm's `sync_lookahead` in LiResNet++)."""

    step: int
    lr: float
    sync_lookahead: bool = False


def manifold_update(x: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], at: StepAt, *, cfg,
                    stats: dict | None = None) -> torch.Tensor:
    """New value of the stacked matrices `x` (b, r, c) after the optimizer step `at`; `state` (stacked like x,
    updated in place or filled) carries the moments and the Lookahead copy."""
    step, lr, sync_lookahead = at.step, at.lr, at.sync_lookahead
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, g = x.to(dtype), grad.to(dtype)
    if cfg.retraction == "polar_ns":
        return _polar_ns_update(x, g, state, step=step, lr=lr, cfg=cfg, stats=stats)
    wide = x.shape[-2] < x.shape[-1]
    square = x.shape[-2] == x.shape[-1]
    if cfg.lookahead_k > 0 and "slow" not in state:
        state["slow"] = x.clone()
    xt, gt = _t(x, wide), _t(g, wide)
    rot = torch.float64 if cfg.rotation_dtype == "float64" else dtype  # the rotation's arithmetic
    if square:
        m = xt.mT @ gt
        a = -lr * _normalized(_direction(0.5 * (m - m.mT), state, step, cfg), cfg)
        y = (xt.to(rot) @ fast_exp(a.to(rot), **_branching(cfg, stats), stats=stats)).to(dtype)
    else:
        xg = xt.mT @ gt
        riemannian = gt - xt @ (0.5 * (xg + xg.mT))  # X Gamma + (I - X X^T) G
        d = _t(_direction(_t(riemannian, wide), state, step, cfg), wide)  # state in the parameter's orientation
        d = _normalized(d, cfg)
        y = stiefel_exp_action(xt.to(rot), d.to(rot), -0.5 * lr, **_branching(cfg, stats), stats=stats).to(dtype)
    lookahead_now = cfg.lookahead_k > 0 and (_due(step, cfg.lookahead_k) or sync_lookahead)
    if _due(step, cfg.polish_every) and not (lookahead_now and square):  # square: the Lookahead step below
        y = ns_polish(y)  # replaces y by the polished slow copy without reading y (tall: delta = y - slow does)
    if cfg.lookahead_k > 0:
        if square:
            state["delta_sum"] = state["delta_sum"].add_(a) if "delta_sum" in state else a.clone()
        if lookahead_now:
            slow = _t(state["slow"].to(dtype), wide)
            if square:
                slow = slow @ fast_exp(0.5 * state["delta_sum"], **_branching(cfg))
                state["delta_sum"].zero_()
            else:
                delta = y - slow  # Omega S = (S skew(S^T delta) + (I - S S^T) delta) / 2: half way to fast
                slow = stiefel_exp_action(slow, delta - 0.5 * slow @ (slow.mT @ delta), 0.5, **_branching(cfg))
            y = ns_polish(slow) if cfg.polish_every > 0 else slow
    if _due(step, cfg.polar_every):
        y = polar_exact(y).to(dtype)
    out = _t(y, wide).contiguous()
    if cfg.lookahead_k > 0 and (_due(step, cfg.lookahead_k) or sync_lookahead):
        state["slow"] = out.clone()
    elif cfg.lookahead_k > 0 and _due(step, cfg.polar_every):
        state["slow"] = polar_exact(state["slow"]).to(dtype)
    return out


def _polar_ns_update(x, g, state, *, step, lr, cfg, stats):
    exact = _due(step, cfg.polar_every)
    old = state.get("momentum_buffer")
    news, bufs = [], []
    for i in range(x.shape[0]):
        new, buf = riemannian_momentum_step(x[i], g[i], None if old is None else old[i], lr=lr, cfg=cfg,
                                            exact=exact, stats=stats)
        news.append(new)
        bufs.append(buf)
    state["momentum_buffer"] = torch.stack(bufs)
    return torch.stack(news)
