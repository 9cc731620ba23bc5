"""The LipNeXt network and its registry of sizes (plain torch.nn: no DeepSpeed, Ray or I/O here).

images in [0, 1], (B, 3, H, W)
  -> subtract a fixed mean (a translation: Lipschitz constant 1; we never divide by a std)
  -> patchify (a permutation) -> stem projection (isometry 3p^2 -> d)
  -> depth x [shift -> expand -> beta-Abs -> contract] (each 1-Lipschitz)
  -> L2 spatial pooling (1-Lipschitz) -> features (B, d)
  -> linear head -> logits; certification uses the per-pair norms of its rows (paper.md B.1).
So `features` is 1-Lipschitz from raw pixels, and certified radii are in raw [0, 1] pixel space.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lipnext_scale.model.layers import (
    SHIFT_MODES, L2SpatialPool, LipNeXtBlock, OrthogonalProjection, Patchify, fan_flops,
)


class ModelInputError(ValueError):
    """Images handed to a LipNeXt are not what it was built for; the message says what is expected."""


@dataclass(frozen=True)
class ModelSpec:
    width: int
    depth: int
    expansion: int
    patch_size: int
    image_size: int
    num_classes: int
    beta: float = 0.5
    residual_alpha: float = 1.0  # 1.0: plain blocks; < 1: convex residual (1 - a) x + a block(x)
    shift_groups: int = 5
    shift_mode: str = "circular"
    input_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    description: str = ""

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"model spec: {msg}")

        if self.width < 1 or self.depth < 0 or self.expansion < 1 or self.patch_size < 1:
            bad(f"width={self.width}, depth={self.depth}, expansion={self.expansion}, "
                f"patch_size={self.patch_size}: need width, expansion, patch_size >= 1 and depth >= 0")
        if self.image_size % self.patch_size:
            bad(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                "pick an image size divisible by the patch size")
        if self.num_classes < 2:
            bad(f"num_classes={self.num_classes}: need at least 2")
        if not 0.0 <= self.beta <= 1.0:
            bad(f"beta={self.beta}: must be in [0, 1]")
        if not 0.0 < self.residual_alpha <= 1.0:
            bad(f"residual_alpha={self.residual_alpha}: must be in (0, 1]")
        if self.shift_mode not in SHIFT_MODES:
            bad(f"shift_mode={self.shift_mode!r}: choose one of {', '.join(SHIFT_MODES)}")

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def stem_in(self) -> int:
        return 3 * self.patch_size ** 2

    def num_params(self) -> int:
        blocks = self.depth * 2 * self.expansion * self.width ** 2
        return self.stem_in * self.width + blocks + self.width * self.num_classes + self.num_classes

    def flops_per_image(self) -> int:
        """Forward FLOPs of the matmuls (2 per multiply-add); shift, abs and pooling are O(tokens d)."""
        t, d, k = self.tokens, self.width, self.expansion
        return (fan_flops(self.stem_in, d, t) + self.depth * 2 * fan_flops(d, k * d, t)
                + fan_flops(d, self.num_classes, 1))


IMAGENET_MEAN = (0.485, 0.456, 0.406)

_REGISTRY: dict[str, ModelSpec] = {
    "lipnext-tiny": ModelSpec(64, 4, 2, 4, 32, 10, description="tests and the CPU demo"),
    "lipnext-cifar-s": ModelSpec(256, 12, 2, 2, 32, 10, description="CIFAR-10/100, small"),
    "lipnext-cifar-m": ModelSpec(512, 24, 2, 2, 32, 10, description="CIFAR-10/100, medium"),
    "lipnext-cifar-l": ModelSpec(2048, 15, 2, 2, 32, 10,
                                 description="CIFAR-10/100 at the paper's ~256M scale"),
    "lipnext-tinyimagenet": ModelSpec(1024, 16, 2, 4, 64, 200, description="Tiny-ImageNet 64x64"),
    "lipnext-1b": ModelSpec(4096, 15, 2, 16, 224, 1000, input_mean=IMAGENET_MEAN,
                            description="ImageNet 224, ~1B parameters"),
    "lipnext-2b": ModelSpec(4096, 30, 2, 16, 224, 1000, input_mean=IMAGENET_MEAN,
                            description="ImageNet 224, ~2B parameters"),
}


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str, **overrides) -> ModelSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(_REGISTRY)}")
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown model option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    spec = dataclasses.replace(_REGISTRY[name], **{k: v for k, v in overrides.items() if v is not None})
    spec.validate()
    return spec


class LipNeXt(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        spec.validate()
        self.spec = spec
        self.register_buffer("input_mean", torch.tensor(spec.input_mean).view(1, 3, 1, 1), persistent=False)
        self.patchify = Patchify(spec.patch_size)
        self.stem = OrthogonalProjection(spec.stem_in, spec.width)
        self.blocks = nn.ModuleList(
            LipNeXtBlock(spec.width, spec.expansion, spec.beta, spec.shift_groups, spec.shift_mode,
                         spec.residual_alpha)
            for _ in range(spec.depth)
        )
        self.pool = L2SpatialPool()
        self.head = nn.Linear(spec.width, spec.num_classes)
        if not self.head.weight.is_meta:
            with torch.no_grad():  # rows of norm ~1: margins start at the scale of the certificate
                nn.init.normal_(self.head.weight, std=spec.width ** -0.5)
                self.head.bias.zero_()

    def check_input(self, x: torch.Tensor) -> None:
        s = self.spec
        expected = f"(B, 3, {s.image_size}, {s.image_size}) float images in [0, 1]"
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ModelInputError(f"input of shape {got}: expected {expected}")
        if x.shape[1] != 3:
            raise ModelInputError(f"input has {x.shape[1]} channels: expected 3 (RGB), {expected}; "
                                  "convert grayscale with x.expand(-1, 3, -1, -1)")
        if x.shape[2] != s.image_size or x.shape[3] != s.image_size:
            raise ModelInputError(f"input images are {x.shape[2]}x{x.shape[3]}: this model takes "
                                  f"{s.image_size}x{s.image_size}; resize the data or build the model "
                                  f"with image_size={x.shape[2]}")
        if not x.is_floating_point():
            raise ModelInputError(f"input dtype {x.dtype}: expected floats in [0, 1] (divide uint8 by 255)")
        # One reduction and a host sync per batch: negligible next to the network, and a NaN image
        # would otherwise flow into logits and certificates silently.
        if not bool(torch.isfinite(x).all()):
            raise ModelInputError("input contains NaN or inf; images must be finite floats in [0, 1] "
                                  "(check the data pipeline's decode and normalisation)")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1-Lipschitz feature map: raw pixels (B, 3, H, W) -> (B, width)."""
        self.check_input(x)
        x = self.patchify(x - self.input_mean.to(x.dtype))
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def create_model(name: str, num_classes: int | None = None, image_size: int | None = None,
                 device: torch.device | str | None = None, **overrides) -> LipNeXt:
    """Build a registered LipNeXt. `device="meta"` sizes a 2B model in seconds without memory."""
    spec = get_spec(name, num_classes=num_classes, image_size=image_size, **overrides)
    if device is None:
        return LipNeXt(spec)
    with torch.device(device):
        return LipNeXt(spec)


def model_info(name: str) -> dict:
    spec = get_spec(name)
    return {
        "name": name, "params": spec.num_params(), "width": spec.width, "depth": spec.depth,
        "expansion": spec.expansion, "patch_size": spec.patch_size, "image_size": spec.image_size,
        "num_classes": spec.num_classes, "flops_per_image": spec.flops_per_image(),
        "description": spec.description,
    }
