"""The whole network: registry, sizes, 1-Lipschitz features, bf16 agreement, input errors."""

import time

import pytest
import torch

from lipnext_scale.model import ModelInputError, create_model, get_spec, list_models, model_info
from lipnext_scale.model.lipschitz import (
    jacobian_spectral_norm, max_orthogonality_error, rigorous_lipschitz_bound,
)


def test_registry_has_the_paper_sizes_with_their_sources():
    names = list_models()
    for required in ("lipnext-tiny", "lipnext-l32w1024", "lipnext-l32w2048", "lipnext-1b", "lipnext-2b"):
        assert required in names
    assert model_info("lipnext-tiny")["params"] < 1_000_000
    expected = {"lipnext-l32w1024": (32, 1024, "paper"), "lipnext-l32w2048": (32, 2048, "paper"),
                "lipnext-1b": (32, 4096, "paper"), "lipnext-2b": (64, 4096, "inferred")}
    for name, (depth, width, source) in expected.items():
        info = model_info(name)
        assert (info["depth"], info["width"], info["source"]) == (depth, width, source)
        assert abs(info["params"] / (2 * depth * width ** 2) - 1) < 0.05  # a block holds 2 C^2 entries
    assert model_info("lipnext-1b")["image_size"] == 224 and model_info("lipnext-1b")["patch_size"] == 16


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
    assert get_spec("lipnext-tiny", width=48).width == 48


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
    model = create_model("lipnext-tiny").eval()
    with torch.no_grad():  # trained-looking translations
        for block in model.blocks:
            block.pos.normal_()
            block.bias.normal_(std=0.1)
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
        model.blocks[1].mix.mul_(1.1)
    bound = rigorous_lipschitz_bound(model)
    assert bound >= 1.1  # a true upper bound of ||W||_2 = 1.1
    x = torch.rand(1, 3, 32, 32)
    assert jacobian_spectral_norm(model.features, x, iters=30) <= bound * (1 + 1e-5)


def test_rigorous_bound_counts_r_twice():
    """R is applied twice per block (R, then M R^T): scaling R by s scales the block by s^2."""
    model = create_model("lipnext-tiny", depth=1)
    with torch.no_grad():
        model.blocks[0].rot.mul_(1.1)
    assert rigorous_lipschitz_bound(model) >= 1.21
    assert model.lipschitz_path() == ["stem.weight", "blocks.0.rot", "blocks.0.rot", "blocks.0.mix"]


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
    with pytest.raises(TypeError, match="block"):  # the earlier expand/contract block is gone
        create_model("lipnext-tiny", block="expand")

