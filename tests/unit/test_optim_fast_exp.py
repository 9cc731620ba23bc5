"""FastExp, its Stiefel action, the exact polar, Lookahead and the Adam-type moments: against closed forms."""

import math

import pytest
import torch

from lipnext_scale.config import OptimConfig
from lipnext_scale.optim import (
    ERROR_TARGETS, StepAt, branch_names, choose_branch, drain_fast_exp_stats, fast_exp, fast_exp_error_bound,
    manifold_update, ns_polish, orthogonality_error, polar_exact, remainder_bound, stiefel_exp_action, taylor_order,
)


def _skew(p: int, norm: float, batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.randn(batch, p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = g - g.mT
    return a / torch.linalg.matrix_norm(a)[:, None, None] * norm


def _orth(n: int, p: int, seed: int = 0, batch: tuple = ()) -> torch.Tensor:
    g = torch.randn(*batch, n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(g)[0]


# norms on every branch of the paper's rule: order 2 (< 0.05), 3 (< 0.25), 4 (< 1), beyond (>= 1), at each threshold
@pytest.mark.parametrize("norm,order", [(0.01, 2), (0.049, 2), (0.05, 3), (0.2, 3), (0.25, 4), (0.9, 4),
                                        (1.0, None), (3.0, None), (12.0, None)])
@pytest.mark.parametrize("rule", ["frobenius", "rho"])
def test_fast_exp_matches_matrix_exp_within_its_stated_bound_on_every_branch(norm, order, rule):
    assert taylor_order(norm) == order
    a = _skew(16, norm * (1 + 1e-9))  # just above a threshold, not rounded below it
    if order is not None:
        assert fast_exp_error_bound(norm, rule="frobenius") == pytest.approx(
            norm ** (order + 1) / math.factorial(order + 1) * math.exp(norm), rel=1e-6)
    stats = {}
    y = fast_exp(a, rule=rule, stats=stats)
    fro = torch.linalg.matrix_norm(a)
    rho = torch.linalg.matrix_norm(a @ a).sqrt()
    plan = choose_branch(fro, rho, 3, rule)
    target = torch.linalg.matrix_exp(a * (plan.scale * 2.0 ** plan.levels)[:, None, None])  # exp(cA) if clipped
    for i in range(a.shape[0]):
        bound = float(plan.error_bound[i])
        assert bound <= max(ERROR_TARGETS)  # the paper's targets, on every branch
        err = float(torch.linalg.matrix_norm(y[i] - target[i]))
        assert err <= bound + 1e-13, (i, err, bound)
        if rule == "frobenius" and order is not None:  # the paper's own branch and bound
            assert int(plan.branch[i]) == order - 2
            assert err <= fast_exp_error_bound(float(fro[i]), rule="frobenius") * (1 + 1e-9) + 1e-13
        # orthogonality it keeps: ||Y^T Y - I|| <= 2 ||Y - exp(A)|| + ||Y - exp(A)||^2
        orth = float(torch.linalg.matrix_norm(y[i].mT @ y[i] - torch.eye(16, dtype=torch.float64)))
        assert orth <= 2 * bound + bound ** 2 + 1e-13
    counts = drain_fast_exp_stats(stats)
    assert float(counts["counts"].sum()) == a.shape[0] and counts["norms"].shape == (2, a.shape[0])
    assert stats == {}


def test_rho_lies_between_the_spectral_and_the_frobenius_norm_and_bounds_the_remainder():
    """For skew A: ||A||_2 <= sqrt(||A^2||_F) <= ||A||_F, and ||exp(A) - T_k(A)||_F <= ||A||_F rho^k e^rho/(k+1)!
    (the derivation in fast_exp.py), checked on low-rank and full-rank skew matrices."""
    gen = torch.Generator().manual_seed(5)
    for rank in (2, 4, 32):
        u = torch.randn(32, rank, dtype=torch.float64, generator=gen)
        v = torch.randn(32, rank, dtype=torch.float64, generator=gen)
        a = u @ v.T - v @ u.T
        for norm in (0.1, 0.8, 2.5):
            a = a / torch.linalg.matrix_norm(a) * norm
            spec, rho = float(torch.linalg.matrix_norm(a, ord=2)), float(torch.linalg.matrix_norm(a @ a).sqrt())
            assert spec <= rho * (1 + 1e-12) and rho <= norm * (1 + 1e-12)
            exact, term, taylor = torch.linalg.matrix_exp(a), torch.eye(32, dtype=torch.float64), 0
            for k in range(5):
                taylor = taylor + term
                term = term @ a / (k + 1)
                if k >= 2:
                    err = float(torch.linalg.matrix_norm(exact - taylor))
                    assert err <= remainder_bound(k, norm, rho) * (1 + 1e-9)
                    assert remainder_bound(k, norm, rho) <= remainder_bound(k, norm, norm)


def test_the_rho_rule_never_takes_a_costlier_branch_than_the_paper_s():
    fro = torch.logspace(-3, 1.5, 200, dtype=torch.float64)
    for frac in (1.0, 0.7, 0.3):
        rho_plan = choose_branch(fro, fro * frac, 3, "rho")
        paper = choose_branch(fro, fro * frac, 3, "frobenius")
        assert bool((rho_plan.branch <= paper.branch).all())
        if frac < 1:
            assert bool((rho_plan.branch < paper.branch).any())


def test_large_steps_are_squared_then_shortened_not_sent_to_matrix_exp():
    fro = torch.tensor([0.5, 1.5, 3.0, 5.5, 400.0], dtype=torch.float64)
    plan = choose_branch(fro, fro, 3, "frobenius")
    assert plan.levels.tolist() == [0, 1, 2, 3, 3]
    names = branch_names(3)
    assert [names[i] for i in plan.branch.tolist()] == ["order4", "squared1", "squared2", "squared3", "clipped"]
    assert float(plan.scale[-1]) * 8 * 400 < 8.0  # the clipped step is a trust region, far shorter
    assert bool((plan.error_bound < ERROR_TARGETS[2]).all())


def test_fast_exp_branch_is_chosen_per_matrix_not_per_batch():
    a = torch.cat([_skew(8, 0.01, 1), _skew(8, 0.5, 1, seed=1), _skew(8, 2.0, 1, seed=2)])
    batched = fast_exp(a)
    for i in range(3):
        assert torch.allclose(batched[i], fast_exp(a[i:i + 1])[0], atol=1e-14)
    assert torch.allclose(batched[0], torch.linalg.matrix_exp(a[0]), atol=1e-7)  # order 2, not squared


def test_fast_exp_makes_no_host_read(monkeypatch):
    """The branch is chosen on the device: no .item(), bool(), float(), tolist() or .cpu() of a tensor."""
    a = _skew(8, 3.0, 4).float()
    x = _orth(24, 8).float()
    d = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kw):
            calls.append(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    stats = {}
    fast_exp(a, stats=stats)
    stiefel_exp_action(x, d, 0.5, stats=stats)
    # whole updates: square and tall, Adam moments, Lookahead sync steps included (not the fp64 polar steps)
    cfg = _cfg(lookahead_k=2, polar_every=0)
    for shape in ((3, 8, 8), (2, 24, 8), (2, 8, 24)):
        x = torch.linalg.qr(torch.randn(*shape[:1], max(shape[1:]), min(shape[1:])))[0]
        x = x if shape[1] >= shape[2] else x.mT.contiguous()
        state = {}
        for step in range(4):
            x = manifold_update(x, torch.randn(shape), state, StepAt(step, 0.3), cfg=cfg, stats=stats)
    monkeypatch.undo()
    assert calls == []
    assert float(drain_fast_exp_stats(stats)["counts"].sum()) == 4 + 1 + 4 * (3 + 2 + 2)


def test_fast_exp_float32_and_bad_shape():
    a = _skew(32, 0.5).float()
    assert fast_exp(a).dtype == torch.float32
    assert fast_exp(a.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(\.\.\., p, p\)"):
        fast_exp(torch.zeros(3, 4))


@pytest.mark.parametrize("coef", [2e-4, 2e-3, 1e-2, 0.1])  # ||Omega|| on the four branches (n=40, p=8)
def test_stiefel_action_is_fast_exp_of_the_ambient_generator(coef):
    x, d = _orth(40, 8), torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    omega = coef * (d @ x.T - x @ d.T)  # n x n, only for the check
    y = stiefel_exp_action(x, d, coef)
    norm = float(torch.linalg.matrix_norm(omega))
    assert torch.allclose(y, fast_exp(omega[None])[0] @ x, atol=1e-12)
    assert float(torch.linalg.matrix_norm(y - torch.linalg.matrix_exp(omega) @ x)) <= fast_exp_error_bound(norm) + 1e-12
    # it moves the column space: the projector X X^T changes
    assert float((y @ y.T - x @ x.T).abs().max()) > 1e-2 * coef


def test_stiefel_action_keeps_w_t_w_and_agrees_with_the_square_rule():
    x, d = _orth(48, 16), torch.randn(48, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = stiefel_exp_action(x, d, 1e-3)
    bound = fast_exp_error_bound(float(torch.linalg.matrix_norm(1e-3 * (d @ x.T - x @ d.T))))
    assert orthogonality_error(y) <= 2 * bound + bound ** 2  # the truncation error, nothing more
    q, e = _orth(12, 12, seed=4), torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    a = 1e-2 * (q.T @ e - e.T @ q)  # X^T Omega X for Omega = c (D X^T - X D^T)
    assert torch.allclose(q @ fast_exp(a[None])[0], stiefel_exp_action(q, e, 1e-2), atol=1e-14)


def test_polar_exact_matches_svd_and_ns_polish_squares_the_error():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(2, 30, 6, dtype=torch.float64, generator=gen)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(polar_exact(w), u @ vh, atol=1e-12)
    assert torch.allclose(polar_exact(w.mT), (u @ vh).mT, atol=1e-12)  # wide
    x = _orth(30, 6) + 1e-4 * torch.randn(30, 6, dtype=torch.float64, generator=gen)
    e0 = orthogonality_error(x)
    assert orthogonality_error(ns_polish(x[None])[0]) <= 2 * e0 * e0  # ~3/4 e^2 per eigenvalue


def _cfg(**kw):
    base = dict(lr=0.01, total_steps=100, polar_every=0, lookahead_k=0, polish_every=0)
    return OptimConfig(**{**base, **kw})


def test_adam_moments_first_step_is_a_unit_sign_rotation_in_the_body_frame():
    x = _orth(10, 10)[None].float()
    g = torch.randn(1, 10, 10, generator=torch.Generator().manual_seed(10))
    state = {}
    y = manifold_update(x, g, state, StepAt(0, 0.01), cfg=_cfg())
    m = x.mT @ g
    gamma = 0.5 * (m - m.mT)  # body-frame Riemannian gradient (exactly skew: Adam's sign keeps the zero diagonal)
    a = -0.01 * gamma / (gamma.abs() + 1e-8)  # step 1: m_hat / sqrt(v_hat) = sign
    assert torch.allclose(y, x @ fast_exp(a), atol=1e-6)
    assert set(state) == {"exp_avg", "exp_avg_sq"} and torch.allclose(state["exp_avg"], 0.1 * gamma)
    # the moments of a constant Riemannian gradient stay skew: the direction is a rotation generator
    for step in range(1, 4):
        manifold_update(y, g, state, StepAt(step, 0.01), cfg=_cfg())
    assert torch.allclose(state["exp_avg"], -state["exp_avg"].mT, atol=1e-6)


def test_tall_update_first_order_is_minus_lr_times_the_canonical_gradient():
    x = _orth(24, 6)[None]
    g = torch.randn(1, 24, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    y = manifold_update(x, g, {}, StepAt(0, 1e-4), cfg=_cfg(moments="momentum", momentum=0.0))
    canonical = g - x @ g.mT @ x  # Edelman et al.'s gradient for the canonical metric
    assert torch.allclose((y - x) / 1e-4, -0.5 * canonical, atol=1e-3)
    assert orthogonality_error(y[0]) < 1e-12


@pytest.mark.parametrize("shape", [(12, 12), (24, 6), (6, 24)])
def test_manifold_lookahead(shape):
    """Square: after k steps slow = slow_0 FastExp(1/2 sum of the k generators), and fast <- slow. Tall/wide:
    the slow copy moves about half way toward the fast one. Either way both stay on the manifold."""
    k = 3
    x0 = (_orth(*shape) if shape[0] >= shape[1] else _orth(shape[1], shape[0]).T.contiguous())[None]
    grads = [torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(k)]

    def run(lookahead_k):
        cfg = _cfg(lookahead_k=lookahead_k, moments="momentum", momentum=0.5, lr=0.05, polish_every=1)
        state, x = {}, x0
        for step, g in enumerate(grads):
            x = manifold_update(x, g, state, StepAt(step, 0.05), cfg=cfg)
        return x, state

    x, state = run(k)
    fast, free = run(100)  # the same k fast steps without a sync
    assert torch.equal(x, state["slow"])  # fast <- slow at the sync
    assert orthogonality_error(x[0]) < 1e-10
    if shape[0] == shape[1]:
        assert torch.allclose(x, ns_polish(x0 @ fast_exp(0.5 * free["delta_sum"])), atol=1e-12)
        assert torch.count_nonzero(state["delta_sum"]) == 0  # the sum restarts
    else:
        moved, full = (float(torch.linalg.matrix_norm(v[0] - x0[0])) for v in (x, fast))
        assert 0.4 * full < moved < 0.6 * full


def test_normalized_step_fixes_the_generator_norm_at_lr_sqrt_p():
    for shape in ((2, 16, 16), (2, 40, 8)):
        x = torch.linalg.qr(torch.randn(shape[0], shape[1], shape[2], dtype=torch.float64))[0]
        stats = {}
        for scale in (1e-3, 1e3):  # whatever the gradient's size
            g = scale * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            manifold_update(x, g, {}, StepAt(5, 0.01), cfg=_cfg(normalize_step=True), stats=stats)
        fro = drain_fast_exp_stats(stats)["norms"][0]
        p = min(shape[1:])
        want = 0.01 * p ** 0.5 * (1.0 if shape[1] == shape[2] else 0.5 * 2 ** 0.5)  # tall: ||c (D X^T - X D^T)||_F
        if shape[1] == shape[2]:
            assert torch.allclose(fro, torch.full_like(fro, want), rtol=1e-9)
        else:
            assert bool((fro <= 2 * 0.5 * 0.01 * p ** 0.5 + 1e-12).all())


@pytest.mark.parametrize("rotation_dtype", ["float32", "float64"])
def test_rotation_dtype_and_polish_period(rotation_dtype):
    """fp32 masters: with the polish every step the error stays at fp32 rounding; a float64 rotation without any
    polish stays within a few rounding units per step taken (no truncation drift at small steps)."""
    torch.manual_seed(0)
    x = torch.linalg.qr(torch.randn(2, 64, 64))[0]
    results = {}
    for polish_every in (1, 0):
        cfg, y, state = _cfg(rotation_dtype=rotation_dtype, polish_every=polish_every), x.clone(), {}
        for step in range(50):
            y = manifold_update(y, torch.randn(2, 64, 64), state, StepAt(step, 1e-3), cfg=cfg)
        assert y.dtype == torch.float32
        results[polish_every] = max(orthogonality_error(y[i]) for i in range(2))
    assert results[1] < 2e-6
    if rotation_dtype == "float64":
        assert results[0] < 2e-5


def test_the_squaring_budget_follows_what_recent_steps_needed():
    from lipnext_scale.optim.fast_exp import next_squaring_budget

    # counts: order2, order3, order4, squared1..3, clipped
    assert next_squaring_budget([5, 1, 0, 0, 0, 0, 0], 3, 3) == 1  # all on Taylor: one squaring kept in reserve
    assert next_squaring_budget([0, 0, 2, 3, 0, 0, 0], 3, 1) == 2
    assert next_squaring_budget([0, 0, 0, 0, 0, 0, 1], 3, 1) == 3  # a clipped step: the whole budget back
    assert next_squaring_budget([0] * 7, 3, 2) == 2  # no updates: unchanged
    # a budget below what a matrix needs shortens its step (counted clipped), never exceeds the target
    fro = torch.tensor([3.0], dtype=torch.float64)
    plan = choose_branch(fro, fro, 3, "frobenius", budget=1)
    assert branch_names(3)[int(plan.branch[0])] == "clipped" and int(plan.levels[0]) == 1
    assert float(plan.error_bound[0]) < ERROR_TARGETS[2] and float(plan.scale[0]) * 2 * 3.0 < 3.0
    a = _skew(8, 3.0, 1)
    y = fast_exp(a, budget=1, rule="frobenius")
    exact = torch.linalg.matrix_exp(a * float(plan.scale[0] * 2))
    assert float(torch.linalg.matrix_norm(y[0] - exact[0])) <= float(plan.error_bound[0]) + 1e-13


def test_the_optimizer_adapts_its_budget_at_log_steps():
    from lipnext_scale.model import create_model
    from lipnext_scale.optim import ManifoldOptimizer

    torch.manual_seed(0)
    model = create_model("lipnext-tiny", depth=1)
    opt = ManifoldOptimizer(model, _cfg(lr=1e-3))
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    scalars = opt.fast_exp_scalars()
    assert scalars["fast_exp/updates"] > 0 and scalars["fast_exp/share_clipped"] == 0
    assert scalars["fast_exp/squaring_budget"] == 1.0  # tiny steps: Taylor order <= 4, one squaring in reserve
    assert sum(v for k, v in scalars.items() if k.startswith("fast_exp/share_")) == pytest.approx(1.0)


def test_a_requested_lookahead_sync_ends_the_next_step_with_slow_equal_to_fast():
    """Before an evaluation or a checkpoint (LiResNet++: every epoch end) slow and fast weights are synchronised:
    the step does the Lookahead update early, for the manifold matrices and the Euclidean parameters alike."""
    from lipnext_scale.model import create_model
    from lipnext_scale.optim import ManifoldOptimizer

    torch.manual_seed(0)
    model = create_model("lipnext-tiny", depth=1)
    opt = ManifoldOptimizer(model, _cfg(lr=1e-2, lookahead_k=6, euclid_lookahead_k=6, euclid_lr=1e-2))
    x = torch.rand(4, 3, 32, 32)
    for step in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        if step == 2:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.request_lookahead_sync()
        opt.step()
    for name, p in opt.named_manifold_params():
        assert torch.equal(opt.state[p]["slow"], p.detach()), name  # fast <- slow
        assert torch.count_nonzero(opt.state[p]["delta_sum"]) == 0 if p.shape[0] == p.shape[1] else True
        assert orthogonality_error(p.detach()) < 1e-5
    euclid = {n: q for g in opt._groups("euclidean") for n, q in zip(g["names"], g["params"])}
    for name, q in euclid.items():
        state = opt._euclid.state[q]
        assert torch.equal(state["lookahead_slow"], q.detach()), name
    # a step without a request leaves the windows alone (k = 6 not reached)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    assert any(not torch.equal(opt._euclid.state[q]["lookahead_slow"], q.detach()) for q in euclid.values())
    assert not all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
