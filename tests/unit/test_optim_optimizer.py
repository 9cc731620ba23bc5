"""ManifoldOptimizer (single process): stays on the manifold, solves Procrustes, trains a tiny LipNeXt."""

import logging

import pytest
import torch
from torch import nn

from lipnext_scale.config import OptimConfig
from lipnext_scale.model import create_model
from lipnext_scale.model.layers import OrthogonalProjection
from lipnext_scale.optim import ManifoldOptimizer, ManifoldParameterError, orthogonality_error, tangent_skew_error

# The update rules: the paper's default (FastExp, Adam-type moments, Lookahead), FastExp with heavy-ball,
# and the pre-FastExp default (Riemannian heavy-ball + Newton-Schulz polar) kept for the ablation.
RULES = {
    "fast_exp_adam": dict(retraction="fast_exp", moments="adam"),
    "fast_exp_momentum": dict(retraction="fast_exp", moments="momentum"),
    "polar_ns": dict(retraction="polar_ns", moments="momentum"),
}
BIG_LR = {"fast_exp_adam": 0.05, "fast_exp_momentum": 0.2, "polar_ns": 0.5}  # large steps for each rule


class Mats(nn.Module):
    """Three manifold matrices (square, tall, wide) and a Euclidean bias."""

    def __init__(self):
        super().__init__()
        self.sq, self.tall, self.wide = OrthogonalProjection(16, 16), OrthogonalProjection(8, 24), OrthogonalProjection(24, 8)
        self.bias = nn.Parameter(torch.zeros(8))

    def loss(self, a, b):
        return sum(((m.weight @ a[: m.d_in] - b[: m.d_out]) ** 2).sum() for m in (self.sq, self.tall, self.wide)) \
            + (self.bias ** 2).sum()


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
def test_1000_large_steps_stay_orthogonal_without_reorthogonalisation(rule):
    torch.manual_seed(0)
    model = Mats()
    cfg = OptimConfig(lr=BIG_LR[rule], momentum=0.9, **RULES[rule], polar_every=0, total_steps=1000,
                      min_lr_ratio=1.0)
    opt = ManifoldOptimizer(model, cfg)
    gen = torch.Generator().manual_seed(1)
    for step in range(1000):
        a, b = torch.randn(24, 8, generator=gen), torch.randn(24, 8, generator=gen)  # a new problem each step
        opt.zero_grad()
        model.loss(a, b).backward()
        before = {n: p.detach().clone() for n, p in opt.named_manifold_params()}
        opt.step()
        if step % 250 == 0 and rule == "polar_ns":  # its direction -lr m is tangent where it was taken
            for n, p in opt.named_manifold_params():
                m = opt.state[p]["momentum_buffer"]
                # relative: in fp32 the projection is exact only up to the point's own rounding (~1e-7)
                assert tangent_skew_error(before[n], m) <= 1e-5 * float(m.abs().max()), n
    assert opt.step_count == 1000 and opt.skipped_steps == 0
    for n, p in opt.named_manifold_params():
        assert orthogonality_error(p) <= 1e-5, n


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", [(12, 12), (20, 6)])
def test_procrustes_reaches_the_svd_solution(rule, shape):
    n, p = shape
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(p, 40, generator=gen, dtype=torch.float64)
    b = torch.randn(n, 40, generator=gen, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(b @ a.T, full_matrices=False)
    solution = u @ vh  # argmin ||X A - B||_F over X^T X = I

    layer = OrthogonalProjection(p, n, dtype=torch.float64)
    if n == p and torch.linalg.det(layer.weight) * torch.linalg.det(solution) < 0:
        with torch.no_grad():  # O(n) has two components (det +-1); a retraction never leaves its own
            layer.weight[0].neg_()
    lr = {"fast_exp_adam": 0.02, "fast_exp_momentum": 0.01, "polar_ns": 0.01}[rule]
    adam = rule == "fast_exp_adam"  # Adam's normalised steps settle only as the lr decays
    cfg = OptimConfig(lr=lr, momentum=0.9, **RULES[rule], total_steps=600, min_lr_ratio=0.0 if adam else 1.0,
                      polar_every=0, lookahead_k=0 if adam else 5)
    opt = ManifoldOptimizer(layer, cfg)
    for _ in range(600):
        opt.zero_grad()
        ((layer.weight @ a - b) ** 2).sum().mul(0.5).backward()
        opt.step()
    assert float((layer.weight.detach() - solution).abs().max()) <= 1e-4


@pytest.mark.slow
def test_tiny_lipnext_loss_halves_in_100_steps():
    torch.manual_seed(0)
    model = create_model("lipnext-tiny")
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    opt = ManifoldOptimizer(model, OptimConfig(lr=0.01, euclid_lr=1e-2, total_steps=100, warmup_steps=5))
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x) * 10.0, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    assert max(orthogonality_error(p) for _, p in opt.named_manifold_params()) <= 1e-5


def test_non_matrix_tagged_orthogonal_is_a_clear_error():
    class Bad(nn.Module):
        manifold_names = ("weight",)

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4, 4))

    with pytest.raises(ManifoldParameterError, match=r"'weight' is tagged orthogonal .* shape \(4, 4, 4\)"):
        ManifoldOptimizer(Bad(), OptimConfig())


def test_non_orthogonal_initial_value_is_a_clear_error():
    layer = OrthogonalProjection(8, 8)
    with torch.no_grad():
        layer.weight.mul_(1.1)
    with pytest.raises(ManifoldParameterError, match=r"not \(semi-\)orthogonal.*orthogonalize_exact"):
        ManifoldOptimizer(layer, OptimConfig())


def test_nan_gradient_skips_the_step_logs_and_counts(caplog):
    model = Mats()
    opt = ManifoldOptimizer(model, OptimConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.loss(torch.randn(24, 8), torch.randn(24, 8)).backward()
    model.tall.weight.grad[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        opt.step()
    assert opt.skipped_steps == 1 and opt.step_count == 0
    assert "non-finite gradient in tall.weight" in caplog.text
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_state_dict_is_keyed_by_name_and_resumes_exactly():
    def run(opt, model, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            model.loss(torch.randn(24, 8, generator=gen), torch.randn(24, 8, generator=gen)).backward()
            opt.step()

    torch.manual_seed(0)
    model = Mats()
    cfg = OptimConfig(lr=0.01, total_steps=20, lookahead_k=2, polar_every=3, euclid_optimizer="nadam",
                      euclid_lookahead_k=2)
    opt = ManifoldOptimizer(model, cfg)
    run(opt, model, 3, seed=5)
    state = opt.state_dict()
    assert set(state["manifold"]) == {"sq.weight", "tall.weight", "wide.weight"}
    assert set(state["manifold"]["sq.weight"]) == {"exp_avg", "exp_avg_sq", "slow", "delta_sum"}
    assert set(state["manifold"]["tall.weight"]) == {"exp_avg", "exp_avg_sq", "slow"}
    assert set(state["euclidean"]) == {"bias"}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    run(opt, model, 2, seed=6)

    model2 = Mats()
    model2.load_state_dict(weights)
    opt2 = ManifoldOptimizer(model2, cfg)
    opt2.load_state_dict(state)
    run(opt2, model2, 2, seed=6)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n

    with pytest.raises(ValueError, match="unknown parameter"):
        opt2.load_state_dict({**state, "manifold": {"nope.weight": {"exp_avg": torch.zeros(2, 2)}}})
    with pytest.raises(ValueError, match="does not use"):
        opt2.load_state_dict({**state, "manifold": {"sq.weight": {"momentum_buffer": torch.zeros(16, 16)}}})
    with pytest.raises(ValueError, match="format"):
        opt2.load_state_dict({"momentum": {}})


def test_bf16_model_keeps_an_fp32_master():
    layer = OrthogonalProjection(32, 32, dtype=torch.bfloat16)
    opt = ManifoldOptimizer(layer, OptimConfig(lr=0.02, total_steps=50, min_lr_ratio=1.0))
    for _ in range(20):
        opt.zero_grad()
        (layer.weight.float() ** 3).sum().backward()
        opt.step()
    master = opt.state[layer.weight]["master"]
    assert master.dtype == torch.float32 and orthogonality_error(master) <= 1e-5
    assert torch.equal(layer.weight, master.bfloat16())


def test_zero3_client_optimizer_never_touches_the_manifold_group():
    from lipnext_scale.optim import build_zero3_optimizers

    model = Mats()
    with torch.no_grad():
        model.bias.fill_(1.0)
    opt, names = build_zero3_optimizers(model, OptimConfig(euclid_lr=0.1))
    assert names == ["sq.weight", "tall.weight", "wide.weight"]
    manifold_group = next(g for g in opt.param_groups if g.get("manifold"))
    assert manifold_group["lr"] == 0.0 and len(manifold_group["params"]) == 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.loss(torch.randn(24, 8), torch.randn(24, 8)).backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n != "bias")
    assert not torch.equal(model.bias, before["bias"])
    assert all(not opt.state[p] for p in manifold_group["params"])  # no Adam state for them
    assert len(manifold_group["params"]) == 3  # restored after the step
