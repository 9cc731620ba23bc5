"""The whole network: registry, sizes, 1-Lipschitz features, bf16 agreement, input errors."""

import time

import pytest
import torch

from lipnext_scale.model import ModelInputError, create_model, get_spec, list_models, model_info
from lipnext_scale.model.lipschitz import (
    jacobian_spectral_norm, max_orthogonality_error, rigorous_lipschitz_bound,
)


def test_registry_has_every_size_with_the_promised_counts():
    names = list_models()
    for required in ("lipnext-tiny", "lipnext-cifar-s", "lipnext-tinyimagenet", "lipnext-1b", "lipnext-2b"):
        assert required in names
    assert model_info("lipnext-tiny")["params"] < 1_000_000
    assert abs(model_info("lipnext-1b")["params"] / 1e9 - 1) < 0.10
    assert abs(model_info("lipnext-2b")["params"] / 2e9 - 1) < 0.10


@pytest.mark.parametrize("name", list_models())
def test_meta_construction_is_fast_and_counts_match(name):
    start = time.perf_counter()
    model = create_model(name, device="meta")
    built = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) == model_info(name)["params"]
    assert built < 30  # a sanity bound against materialising 2B weights, not a benchmark


def test_forward_shapes_and_options():
    model = create_model("lipnext-tiny", num_classes=7, image_size=16)
    out = model(torch.rand(2, 3, 16, 16))
    assert out.shape == (2, 7)
    assert get_spec("lipnext-tiny", width=32).width == 32


def test_tiny_features_are_1_lipschitz_and_not_degenerate():
    """Jacobian spectral norm of the feature map <= 1 + 1e-4 at several random inputs, and well above 0."""
    torch.manual_seed(0)
    model = create_model("lipnext-tiny").eval()
    norms = []
    for seed in range(4):
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        norms.append(jacobian_spectral_norm(model.features, x, iters=30, seed=seed))
    print(f"lipnext-tiny feature Jacobian spectral norms: {norms}")
    assert max(norms) <= 1 + 1e-4
    assert min(norms) > 0.05  # a constant map would give 0
    # and the network does separate inputs: features differ for different images
    f = model.features(torch.rand(8, 3, 32, 32))
    assert f.std(dim=0).mean() > 1e-3


def test_features_lipschitz_on_random_pairs():
    torch.manual_seed(0)
    model = create_model("lipnext-tiny", residual_alpha=0.5).eval()
    g = torch.Generator().manual_seed(3)
    for _ in range(8):
        x = torch.rand(4, 3, 32, 32, generator=g)
        y = (x + 0.05 * torch.randn(4, 3, 32, 32, generator=g))
        lhs = (model.features(x) - model.features(y)).norm(dim=1)
        rhs = (x - y).flatten(1).norm(dim=1)
        assert torch.all(lhs <= rhs * (1 + 1e-5))


def test_rigorous_bound_detects_a_scaled_matrix():
    model = create_model("lipnext-tiny")
    assert rigorous_lipschitz_bound(model) <= 1 + 1e-4
    assert max_orthogonality_error(model) < 1e-5
    with torch.no_grad():
        model.blocks[1].expand.weight.mul_(1.1)
    bound = rigorous_lipschitz_bound(model)
    assert bound >= 1.1  # a true upper bound of ||W||_2 = 1.1
    x = torch.rand(1, 3, 32, 32)
    assert jacobian_spectral_norm(model.features, x, iters=30) <= bound * (1 + 1e-5)


def test_bf16_forward_agrees_with_fp32():
    """bf16 has an 8-bit mantissa: logits agree to within 5% of their scale (relative l2 error)."""
    torch.manual_seed(0)
    model = create_model("lipnext-tiny").eval()
    x = torch.rand(16, 3, 32, 32)
    ref = model(x)
    low = model.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    rel = (low - ref).norm() / ref.norm()
    print(f"bf16 vs fp32 relative logit error: {rel:.4f}")
    assert rel < 0.05


@pytest.mark.parametrize("bad,match", [
    (torch.rand(2, 1, 32, 32), "1 channels"),
    (torch.rand(2, 3, 28, 28), "28x28"),
    (torch.rand(3, 32, 32), "shape"),
    ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "uint8"),
    (torch.full((2, 3, 32, 32), float("nan")), "NaN or inf"),
    (torch.full((2, 3, 32, 32), float("inf")), "NaN or inf"),
])
def test_bad_images_get_clear_errors(bad, match):
    model = create_model("lipnext-tiny")
    with pytest.raises(ModelInputError, match=match):
        model(bad)


def test_unknown_model_and_options_are_named():
    with pytest.raises(KeyError, match="lipnext-huge.*lipnext-tiny"):
        create_model("lipnext-huge")
    with pytest.raises(TypeError, match="colour"):
        create_model("lipnext-tiny", colour="red")
    with pytest.raises(ValueError, match="image_size=30"):
        create_model("lipnext-tiny", image_size=30)
