"""The LipNeXt network and its registry of sizes (plain torch.nn: no DeepSpeed, Ray or I/O here).

images in [0, 1], (B, 3, H, W)
  -> subtract a fixed mean (a translation: Lipschitz constant 1; we never divide by a std)
  -> patchify (a permutation) -> stem projection (isometry 3p^2 -> C; a co-isometry, still
     1-Lipschitz, in the small test models where 3p^2 > C)
  -> depth x [beta_Abs(M R^T S(R(X + p)) + b)]  (the paper's block, each 1-Lipschitz)
  -> L2 spatial pooling (1-Lipschitz) -> features (B, C)
  -> last-layer-normalised linear head -> logits; certification uses the per-pair norms of its
     normalised rows, `model.head.rows()` (paper.md B.1, B.3).
So `features` is 1-Lipschitz from raw pixels, and certified radii are in raw [0, 1] pixel space.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lipnext_scale.config import Architecture
from lipnext_scale.errors import LipnextError
from lipnext_scale.model.layers import (
    SHIFT_MODES, L2SpatialPool, LipNeXtBlock, NormalizedLinear, OrthogonalProjection, Patchify, fan_flops,
)

SOURCES = ("paper", "inferred", "ours")


class ModelInputError(LipnextError, ValueError):
    """Images handed to a LipNeXt are not what it was built for; the message says what is expected."""


@dataclass(frozen=True)
class ModelSpec(Architecture):
    # width, depth, patch_size, image_size, num_classes, beta, shift_alpha, shift_mode, positional: the
    # architecture (config/sections.py `Architecture`, where the job config sees them as model.<name> overrides)
    input_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    source: str = "paper"  # where the size comes from: "paper", "inferred" (from its counts) or "ours"
    description: str = ""

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"model spec: {msg}")

        if self.width < 1 or self.depth < 0 or self.patch_size < 1:
            bad(f"width={self.width}, depth={self.depth}, patch_size={self.patch_size}: need width, "
                "patch_size >= 1 and depth >= 0")
        if self.image_size % self.patch_size:
            bad(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                "pick an image size divisible by the patch size")
        if self.num_classes < 2:
            bad(f"num_classes={self.num_classes}: need at least 2")
        if not 0.0 <= self.beta <= 1.0:
            bad(f"beta={self.beta}: must be in [0, 1]")
        if not 0.0 < self.shift_alpha <= 0.25:
            bad(f"shift_alpha={self.shift_alpha}: the share of channels per direction must be in (0, 1/4]")
        if self.shift_mode not in SHIFT_MODES:
            bad(f"shift_mode={self.shift_mode!r}: choose one of {', '.join(SHIFT_MODES)}")
        if self.source not in SOURCES:
            bad(f"source={self.source!r}: choose one of {', '.join(SOURCES)}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid ** 2

    @property
    def stem_in(self) -> int:
        return 3 * self.patch_size ** 2

    def block_params(self) -> int:
        c = self.width
        return 2 * c * c + c + (self.tokens if self.positional else 0)

    def num_params(self) -> int:
        head = self.width * self.num_classes + self.num_classes
        return self.stem_in * self.width + self.depth * self.block_params() + head

    def flops_per_image(self) -> int:
        """Forward FLOPs of the per-token matmuls (2 per multiply-add). The paper block applies R and then
        M R^T; the C^3 product M R^T is per batch, not per image, and left out, as are shift, beta-Abs
        and pooling (O(tokens C))."""
        t, d = self.tokens, self.width
        return fan_flops(self.stem_in, d, t) + self.depth * 2 * fan_flops(d, d, t) + fan_flops(d, self.num_classes, 1)


IMAGENET_MEAN = (0.485, 0.456, 0.406)

_REGISTRY: dict[str, ModelSpec] = {
    "lipnext-tiny": ModelSpec(64, 8, 4, 32, 10, source="ours", description="tests and the CPU demo"),
    "lipnext-l32w1024": ModelSpec(1024, 32, 2, 32, 10,
                                  description="CIFAR-10 64M (paper Table 1); patch 2 is ours"),
    "lipnext-l32w2048": ModelSpec(2048, 32, 2, 32, 10,
                                  description="CIFAR-10/100, Tiny-ImageNet 256M (paper Table 1); patch 2 is ours"),
    "lipnext-1b": ModelSpec(4096, 32, 16, 224, 1000, input_mean=IMAGENET_MEAN,
                            description="ImageNet 1B = L32W4096 (paper Tables 3-4); patch 16 is ours"),
    "lipnext-2b": ModelSpec(4096, 64, 16, 224, 1000, input_mean=IMAGENET_MEAN, source="inferred",
                            description="ImageNet 2B: L64W4096 inferred from 2 L W^2 = 2B; patch 16 is ours"),
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
        self.check_finite = True  # see check_input
        spec.validate()
        self.spec = spec
        self.register_buffer("input_mean", torch.tensor(spec.input_mean).view(1, 3, 1, 1), persistent=False)
        self.patchify = Patchify(spec.patch_size)
        self.stem = OrthogonalProjection(spec.stem_in, spec.width)
        self.blocks = nn.ModuleList(
            LipNeXtBlock(spec.width, spec.grid, alpha=spec.shift_alpha, beta=spec.beta, shift_mode=spec.shift_mode,
                         positional=spec.positional)
            for _ in range(spec.depth)
        )
        self.pool = L2SpatialPool()
        self.head = NormalizedLinear(spec.width, spec.num_classes)

    def lipschitz_path(self) -> list[str]:
        """Names of the (semi-)orthogonal matrices an input passes through, in order and with repeats (the
        paper block applies R twice): the feature map's Lipschitz constant is at most the product of their
        spectral norms, since every other layer is 1-Lipschitz by construction."""
        return ["stem.weight"] + [f"blocks.{i}.{n}" for i, b in enumerate(self.blocks) for n in b.lipschitz_path()]

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
        # would otherwise flow into logits and certificates silently. Training turns it off
        # (`check_finite = False`): there a NaN input makes a NaN loss, which the loop checks on its
        # sync steps, and a host sync per micro-batch would stall the GPU.
        if self.check_finite and not bool(torch.isfinite(x).all()):
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
        "patch_size": spec.patch_size, "image_size": spec.image_size, "num_classes": spec.num_classes,
        "flops_per_image": spec.flops_per_image(), "source": spec.source, "description": spec.description,
    }
