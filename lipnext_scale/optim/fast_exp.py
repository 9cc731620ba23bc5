"""FastExp (the paper's truncated exponential), its Stiefel action, a Newton-Schulz polish and the exact
polar factor: pure, batched functions on (..., n, p) tensors (paper.md A "Optimizer", B.5).

**Branches.** The paper takes Taylor order 2, 3 or 4 below ||A||_F = 0.05, 0.25, 1 and the exact exponential
above. Its error targets are the remainder bounds at those thresholds, tau_k = t_k^(k+1) e^(t_k) / (k+1)!
(`ERROR_TARGETS`). We keep the targets and choose per matrix, on the device, from a sharper remainder bound:

  For skew A, ||exp(A) - T_k(A)||_F <= ||A||_F ||A||_2^k e^(||A||_2) / (k+1)!   (T_k: Taylor to order k)
  Proof: exp(A) - T_k(A) = sum_{j>k} A^j / j!, and ||A^j||_F <= ||A||_2^(j-1) ||A||_F, so the remainder is at
  most ||A||_F ||A||_2^k / (k+1)! * sum_{m>=0} ||A||_2^m (k+1)! / (k+1+m)! <= that times e^(||A||_2), since
  (k+1)! / (k+1+m)! <= 1 / m!.
  And ||A||_2 <= rho := sqrt(||A^2||_F) <= ||A||_F: A^2 = -A^T A is symmetric with eigenvalues -sigma_i^2, so
  ||A^2||_F = sqrt(sum sigma_i^4) lies between max sigma_i^2 = ||A||_2^2 and sum sigma_i^2 = ||A||_F^2.

So order k suffices when ||A||_F rho^k e^rho / (k+1)! < tau_k (rule "rho", the default; A^2 is computed
anyway), or when ||A||_F^(k+1) e^||A||_F / (k+1)! < tau_k, which is exactly the paper's thresholds (rule
"frobenius"). Since rho <= ||A||_F, the rho rule never needs a higher order than the paper's, at the same
error target. That order is what the branch histogram reports; the polynomial itself is always evaluated to
order 4: in the Horner form below orders 2, 3 and 4 cost the same two batched matmuls (a lower order saves
nothing without a host read to split the batch), order 4's remainder is the smallest (b_4 = b_2 rho^2 / 20),
and an even order keeps orthogonality to O(A^(k+2)) (the A^(k+1) terms of T_k(A)^T T_k(A) cancel), where
order 3 leaves an O(A^4) / 12 defect. Matrices beyond order 4 do not call `matrix_exp` (whose branch needs a host read and costs
~3x): they are **scaled and squared**, Y = T_4(A / 2^s)^(2^s), with s <= `squarings` the least for which
2^s d (1 + d)^(2^s - 1) < tau_4, d the order-4 bound of A / 2^s (if ||T - E|| <= d with E orthogonal, then
||T^m - E^m||_F <= m d (1 + d)^(m - 1)). A matrix that would need more than `squarings` squarings takes a
shortened step A c (c < 1 in closed form on the device, the same bound met): a trust region, counted
as "clipped". The optimizers run fewer squarings than `squarings` when recent steps needed fewer
(`next_squaring_budget`, revised at log steps from the branch counts they read there anyway). Every choice is 0/1 coefficients and `torch.where`, so an update makes **no host read**; its
cost is fixed: two matmuls for the polynomial plus one per allowed squaring. Rounding is not part of the
bounds (it is at the fp32 level; the polish and the periodic fp64 polar remove it).

`branch_counts` (device tensor) records how many matrices took each branch, `BRANCH_NAMES`, and
`fast_exp_norms` the ||A||_F and rho values; `drain_fast_exp_stats` reads and clears them at log steps.

Semi-orthogonal (tall, X^T X = I_p, n > p) matrices move by a left rotation exp(Omega) X with the rank-2p
skew generator Omega = c (D X^T - X D^T) (Wen & Yin's descent curve; it keeps X^T X exactly and moves the
column space). With U = [D, X], V = c [X, -D], Omega = U V^T and Omega^k = U S^(k-1) V^T for S = V^T U
(2p x 2p), so the same truncated series is X + U P(S) V^T X, P(S) = sum_k S^(k-1) / k!: n x p matmuls and
2p x 2p ones, never an n x n matrix. ||Omega||_F and ||Omega^2||_F come from 2p x 2p Gram matrices, and a
squaring (I + U F V^T)^2 = I + U (2F + F S F) V^T stays in the small space. For a square X,
exp(Omega) X = X exp(X^T Omega X): the two agree.
"""

from __future__ import annotations

import math

import torch

from lipnext_scale.config import FastExpRule, choices

FASTEXP_THRESHOLDS = (0.05, 0.25, 1.0)  # the paper's ||A||_F limits of Taylor orders 2, 3, 4
TAYLOR_ORDERS = (2, 3, 4)
ERROR_TARGETS = tuple(t ** (k + 1) * math.exp(t) / math.factorial(k + 1)
                      for k, t in zip(TAYLOR_ORDERS, FASTEXP_THRESHOLDS))
BRANCH_RULES = choices(FastExpRule)
DEFAULT_SQUARINGS = 3  # order 4 of A / 8: up to ||A||_F = 5.8 on the paper's rule (more by rho) before a step is shortened
_TRUST_REGION_ITERATIONS = 3  # pairs of fixed-point steps: the shortened step within ~1e-4 of the largest
_MAX_NORM_SAMPLES = 65536  # ||A||_F / rho values kept per log window for its quantiles


def branch_names(squarings: int) -> list[str]:
    """Names of the branch counters: order2, order3, order4, squared1 .. squaredS, clipped."""
    return ["order2", "order3", "order4", *(f"squared{s}" for s in range(1, squarings + 1)), "clipped"]


def remainder_bound(order: int, fro, rho):
    """Upper bound of ||exp(A) - T_order(A)||_F for skew A with ||A||_F = fro and sqrt(||A^2||_F) = rho
    (floats or tensors; rho = fro gives the paper's bound)."""
    exp = torch.exp if torch.is_tensor(rho) else math.exp
    return fro * rho ** order * exp(rho) / math.factorial(order + 1)


def taylor_order(norm: float) -> int | None:
    """The paper's rule: the order FastExp uses at ||A||_F = `norm` without squaring (None: beyond order 4)."""
    for order, target in zip(TAYLOR_ORDERS, ERROR_TARGETS):
        if remainder_bound(order, norm, norm) < target:
            return order
    return None


def fast_exp_error_bound(norm: float, rho: float | None = None, squarings: int = DEFAULT_SQUARINGS,
                         rule: FastExpRule = "rho") -> float:
    """Upper bound of ||FastExp(A) - exp(A)||_F on the branch FastExp takes for ||A||_F = norm (rounding
    aside); rho defaults to norm (its largest value). A clipped step's target is exp(cA), see `fast_exp`."""
    rho = norm if rho is None else rho
    plan = choose_branch(torch.tensor([norm], dtype=torch.float64), torch.tensor([rho], dtype=torch.float64),
                         squarings, rule)
    return float(plan.error_bound[0])


class BranchPlan:
    """Per matrix: the Taylor order the rule needs as 0/1 flags c3, c4 (order 3, order 4), squarings `levels`,
    the scale applied to A, the branch index into `branch_names`, and the error bound at that order against
    exp(scale * 2^levels * A) (the order-4 polynomial FastExp evaluates is within it)."""

    def __init__(self, c3, c4, levels, scale, branch, error_bound):
        self.c3, self.c4, self.levels, self.scale, self.branch = c3, c4, levels, scale, branch
        self.error_bound = error_bound


def _squared_error(fro, rho, level: int, clip=1.0):
    m = 2.0 ** level
    d = remainder_bound(4, clip * fro / m, clip * rho / m)
    return m * d * (1.0 + d) ** (m - 1.0)


def _trust_region(fro: torch.Tensor, rho: torch.Tensor, level: int) -> torch.Tensor:
    """A step factor c in (0, 1] with `_squared_error(fro, rho, level, c)` < tau_4, near the largest such c, in
    closed form (a few elementwise ops; it was a 30-step bisection, ~250 kernel launches per call on a GPU).
    With m = 2^level, d(c) = c^5 K e^(c r) (K = fro rho^4 / (120 m^5), r = rho / m) is the order-4 bound of
    c A / m. If d(c) <= d* = tau_4 / (m (1 + tau_4 / m)^(m - 1)), then d(c) <= tau_4 / m and so
    m d(c) (1 + d(c))^(m - 1) <= tau_4 (1 - margin). d(c) = d* has one root c*, the fixed point of
    f(x) = c1 e^(-x r / 5), c1 = (d* / K)^(1/5); f is decreasing, so from x0 = 0 the even iterates x2, x4, ...
    rise to c* from below (f(f(x)) is increasing) and every one of them is a valid c. Float64, then a margin
    for rounding; the chosen c's bound is recomputed by the caller and reported."""
    m = 2.0 ** level
    tau4 = ERROR_TARGETS[2]
    f64, r64 = fro.double(), rho.double()
    d_star = tau4 / (m * (1.0 + tau4 / m) ** (m - 1.0)) * (1.0 - 1e-6)
    k = (f64 * r64 ** 4 / (120.0 * m ** 5)).clamp_min(1e-300)
    c1, r = (d_star / k) ** 0.2, r64 / m
    x = torch.zeros_like(f64)
    for _ in range(_TRUST_REGION_ITERATIONS):
        x = c1 * torch.exp(-(c1 * torch.exp(-x * r / 5.0)) * r / 5.0)  # two fixed-point steps: x_{2j+2}
    return (x * (1.0 - 1e-4)).clamp(max=1.0).to(fro.dtype)


def choose_branch(fro: torch.Tensor, rho: torch.Tensor, squarings: int, rule: FastExpRule = "rho",
                  budget: int | None = None) -> BranchPlan:
    """The branch of each matrix from its ||A||_F and rho (see the module docstring); device ops only.
    `budget` (<= squarings) limits the squarings of this call; branch indices always follow `squarings`."""
    allowed = squarings if budget is None else max(0, min(budget, squarings))
    if rule not in BRANCH_RULES:
        raise ValueError(f"fast_exp: rule {rule!r}; choose one of {BRANCH_RULES}")
    rho = fro if rule == "frobenius" else torch.minimum(rho, fro)
    tau2, tau3, tau4 = ERROR_TARGETS
    b2, b3, b4 = (remainder_bound(k, fro, rho) for k in TAYLOR_ORDERS)
    plain = b4 < tau4  # strict, as the paper's ||A||_F < t_k
    c4 = (b3 >= tau3) | ~plain
    c3 = (b2 >= tau2) | c4
    levels = torch.zeros_like(fro, dtype=torch.int64)
    found = plain.clone()
    error = torch.where(c4, b4, torch.where(c3, b3, b2))
    for level in range(1, allowed + 1):
        err = _squared_error(fro, rho, level)
        take = ~found & (err < tau4)
        levels = torch.where(take, level, levels)
        error = torch.where(take, err, error)
        found = found | take
    clipped = ~found
    levels = torch.where(clipped, allowed, levels)
    clip = torch.where(clipped, _trust_region(fro, rho, allowed), torch.ones_like(fro))
    error = torch.where(clipped, _squared_error(fro, rho, allowed, clip), error)
    scale = clip / 2.0 ** levels.to(fro.dtype)
    branch = torch.where(c4, 2, torch.where(c3, 1, 0)) + levels
    branch = torch.where(clipped, squarings + 3, branch)
    return BranchPlan(c3.to(fro.dtype), c4.to(fro.dtype), levels, scale, branch, error)


def _record(stats: dict | None, plan: BranchPlan, fro: torch.Tensor, rho: torch.Tensor, squarings: int) -> None:
    """Adds this call's branch counts and norms to `stats` (device tensors: no host read)."""
    if stats is None:
        return
    n = squarings + 4
    counts = torch.zeros(n, dtype=torch.float64, device=fro.device).index_add_(
        0, plan.branch.reshape(-1), torch.ones(plan.branch.numel(), dtype=torch.float64, device=fro.device))
    key = f"fast_exp_branches/{squarings}"
    stats[key] = stats[key] + counts if key in stats else counts
    norms = stats.setdefault("fast_exp_norms", [])
    norms.append(torch.stack([fro.reshape(-1), rho.reshape(-1)]).double())
    if len(norms) >= 256:  # bounded when nobody drains (an optimizer used outside the loop): newest samples
        norms[:] = [torch.cat(norms, dim=1)[:, -_MAX_NORM_SAMPLES:]]


def drain_fast_exp_stats(stats: dict) -> dict[str, torch.Tensor]:
    """The branch counts and norm samples gathered since the last call, removed from `stats`: {"counts":
    (branches,), "names": [...], "norms": (2, N) ||A||_F and rho}. Device tensors; the caller reads them."""
    out = {}
    for key in [k for k in stats if k.startswith("fast_exp_branches/")]:
        squarings = int(key.split("/")[1])
        out["counts"], out["names"] = stats.pop(key), branch_names(squarings)
    norms = stats.pop("fast_exp_norms", [])
    if norms:
        out["norms"] = torch.cat(norms, dim=1)
    return out


NORM_QUANTILES = (("p50", 0.5), ("p90", 0.9), ("max", 1.0))


def window_summary(stats: dict, squarings: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drains `stats` into (branch counts, [||A||_F, rho] x `NORM_QUANTILES`) device tensors: the counts add
    over ranks, the quantiles are per rank (a collective takes their max)."""
    drained = drain_fast_exp_stats(stats)
    counts = drained.get("counts")
    if counts is None or counts.numel() != squarings + 4:
        counts = torch.zeros(squarings + 4, dtype=torch.float64, device=device)
    norms = drained.get("norms")
    if norms is None or norms.numel() == 0:
        return counts, torch.zeros(2 * len(NORM_QUANTILES), dtype=torch.float64, device=counts.device)
    qs = torch.tensor([q for _, q in NORM_QUANTILES], dtype=torch.float64, device=norms.device)
    return counts, torch.quantile(norms, qs, dim=1).T.reshape(-1)


def next_squaring_budget(counts: list[float], squarings: int, current: int) -> int:
    """Squarings the next log window computes: one more than the most this window needed (all of them after a
    clipped step), at most `squarings`; unchanged after a window without updates. Each squaring is a batched
    matmul every matrix pays (a device-side choice cannot skip it), so a run whose steps stay on Taylor order 4
    pays one, not `squarings`; a step that needs more than the budget is shortened (counted as clipped) and
    the budget grows at the next log step."""
    if sum(counts) <= 0:
        return current
    if counts[-1] > 0:
        return squarings
    used = max((level for level in range(1, squarings + 1) if counts[2 + level] > 0), default=0)
    return min(squarings, used + 1)


def window_scalars(counts: torch.Tensor, quantiles: torch.Tensor, squarings: int) -> dict[str, float]:
    """TensorBoard scalars of one log window: share of matrix updates per branch, norm quantiles (host reads)."""
    total = max(float(counts.sum()), 1.0)
    out = {f"fast_exp/share_{name}": float(c) / total for name, c in zip(branch_names(squarings), counts.tolist())}
    values = quantiles.tolist()
    for i, norm in enumerate(("fro", "rho")):
        for j, (label, _) in enumerate(NORM_QUANTILES):
            out[f"fast_exp/{norm}_{label}"] = values[i * len(NORM_QUANTILES) + j]
    out["fast_exp/updates"] = float(counts.sum())
    return out


def _allowed(squarings: int, budget: int | None) -> int:
    return squarings if budget is None else max(0, min(budget, squarings))


def _eye_like(a: torch.Tensor) -> torch.Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def _b(x: torch.Tensor) -> torch.Tensor:
    return x[..., None, None]


def fast_exp(a: torch.Tensor, *, squarings: int = DEFAULT_SQUARINGS, rule: FastExpRule = "rho",
             stats: dict | None = None, budget: int | None = None) -> torch.Tensor:
    """FastExp of a (batch of) skew matrices (..., p, p), in a's dtype (bf16/fp16 are computed in fp32).
    Error against exp(A) (exp(cA) for a clipped matrix) at most its branch's target; no host read."""
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"fast_exp: expected (..., p, p) skew matrices, got shape {tuple(a.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    a2 = a @ a
    fro = torch.linalg.matrix_norm(a)
    rho = torch.linalg.matrix_norm(a2).sqrt()
    plan = choose_branch(fro, rho, squarings, rule, budget)
    _record(stats, plan, fro, rho, squarings)
    sa, sa2 = a * _b(plan.scale), a2 * _b(plan.scale * plan.scale)
    eye = _eye_like(a)
    # Horner, order 4 on every branch (see the module docstring): I + A + A^2 (I/2 + A/6 + A^2/24), two matmuls
    y = sa2 @ (0.5 * eye + sa / 6.0 + sa2 / 24.0) + sa + eye
    for level in range(_allowed(squarings, budget)):  # one batched matmul per allowed squaring, kept where needed
        y = torch.where(_b(plan.levels > level), y @ y, y)
    return y


def _tall_norm(xx, xd, dd, coef):
    sq = 2.0 * (dd * xx).sum((-2, -1)) - 2.0 * (xd * xd.mT).sum((-2, -1))
    return abs(coef) * sq.clamp_min(0).sqrt()


def stiefel_exp_action(x: torch.Tensor, d: torch.Tensor, coef: float, *, squarings: int = DEFAULT_SQUARINGS,
                       rule: FastExpRule = "rho", stats: dict | None = None, budget: int | None = None) -> torch.Tensor:
    """FastExp(Omega) X for Omega = coef (D X^T - X D^T), tall x and d (..., n, p) (n > p allowed, = p works)."""
    xx, xd, dd = x.mT @ x, x.mT @ d, d.mT @ d
    fro = _tall_norm(xx, xd, dd, coef)
    s = coef * torch.cat([torch.cat([xd, xx], -1), torch.cat([-dd, -xd.mT], -1)], -2)  # V^T U
    gram_u = torch.cat([torch.cat([dd, xd.mT], -1), torch.cat([xd, xx], -1)], -2)  # U^T U
    gram_v = coef * coef * torch.cat([torch.cat([xx, -xd], -1), torch.cat([-xd.mT, dd], -1)], -2)  # V^T V
    # ||Omega^2||_F^2 = ||U S V^T||_F^2 = tr(S^T (U^T U) S (V^T V))
    rho = ((s.mT @ gram_u @ s) * gram_v.mT).sum((-2, -1)).clamp_min(0).sqrt().sqrt()
    plan = choose_branch(fro, rho, squarings, rule, budget)
    _record(stats, plan, fro, rho, squarings)
    w = coef * torch.cat([xx, -xd.mT], -2)  # V^T X
    eye = _eye_like(s)
    ss = s * _b(plan.scale)
    # Phi = scale P(scale S), P(Z) = I + Z/2 + Z^2/6 + Z^3/24 (order 4): exp(scale Omega) ~ I + U Phi V^T
    phi = _b(plan.scale) * (ss @ (0.5 * eye + ss @ (eye / 6.0 + ss / 24.0)) + eye)
    for level in range(_allowed(squarings, budget)):  # (I + U F V^T)^2 = I + U (2F + F S F) V^T
        phi = torch.where(_b(plan.levels > level), 2.0 * phi + phi @ s @ phi, phi)
    return x + torch.cat([d, x], -1) @ (phi @ w)


def ns_polish(y: torch.Tensor) -> torch.Tensor:
    """One Newton-Schulz step toward the polar factor, Y (3I - Y^T Y)/2 (tall y): an orthogonality error e
    becomes ~3/4 e^2, so truncation and rounding errors never accumulate from step to step."""
    gram = y.mT @ y
    return y @ (1.5 * _eye_like(gram) - 0.5 * gram)


def polar_exact(x: torch.Tensor) -> torch.Tensor:
    """Polar factor X (X^T X)^(-1/2) in fp64 (either orientation, batched), by an eigendecomposition of the
    small Gram matrix (an SVD of the full matrix is slow on GPU); SVD if the Gram is near singular."""
    x64 = x.detach().to(torch.float64)
    wide = x64.shape[-2] < x64.shape[-1]
    xt = x64.mT if wide else x64
    evals, evecs = torch.linalg.eigh(xt.mT @ xt)
    if bool((evals.amin(-1) > 1e-12).all()):
        out = xt @ (evecs * evals.rsqrt()[..., None, :]) @ evecs.mT
    else:
        u, _, vh = torch.linalg.svd(xt, full_matrices=False)
        out = u @ vh
    return (out.mT if wide else out).contiguous()
