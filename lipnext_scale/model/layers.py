"""LipNeXt layers: each one is 1-Lipschitz in the l2 norm by construction.

Feature maps are channels-last, (B, H, W, C): the orthogonal projection is then one matmul over the
last dimension and the spatial shift a roll over dims 1 and 2.
"""

from __future__ import annotations

import torch
from torch import nn


class OrthogonalProjection(nn.Module):
    """Per-pixel channel mix `y = x W^T` by a (semi-)orthogonal W of shape (d_out, d_in).

    d_out == d_in: orthogonal, norm preserving. d_out > d_in: an isometry (W^T W = I), norm preserving.
    d_out < d_in: a co-isometry (W W^T = I), norm non-increasing. Either way ||W||_2 = 1.
    The weight lives on its manifold: the manifold optimizer keeps it there, nothing re-parameterises
    it in the forward pass (paper: "constraint-free").
    """

    manifold = True  # marks `weight` for the manifold optimizer and the Lipschitz checks

    def __init__(self, d_in: int, d_out: int, device=None, dtype=None):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.weight = nn.Parameter(torch.empty(d_out, d_in, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:  # big models are sized on `meta`; nothing to initialise
            return
        # QR of a Gaussian in fp32: Haar-distributed (semi-)orthogonal, whatever the storage dtype.
        with torch.no_grad():
            w = torch.empty(self.d_out, self.d_in, dtype=torch.float32, device=self.weight.device)
            nn.init.orthogonal_(w)
            self.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}"


SHIFT_MODES = ("circular", "zero")


class SpatialShift(nn.Module):
    """Parameter-free spatial mixing: channel group g is moved one step in direction g.

    Groups: unshifted, right, left, down, up (the first `groups` of those). With `mode="circular"` the
    shift wraps around and is a permutation of coordinates, hence exactly norm preserving; with
    `mode="zero"` pixels shifted out are dropped (zero padding): norm non-increasing.
    """

    _DIRECTIONS = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))  # (dh, dw)

    def __init__(self, groups: int = 5, mode: str = "circular", step: int = 1):
        super().__init__()
        if not 1 <= groups <= len(self._DIRECTIONS):
            raise ValueError(f"SpatialShift groups={groups}: must be in 1..{len(self._DIRECTIONS)}")
        if mode not in SHIFT_MODES:
            raise ValueError(f"SpatialShift mode={mode!r}: choose one of {', '.join(SHIFT_MODES)}")
        self.groups, self.mode, self.step = groups, mode, step

    def group_bounds(self, channels: int) -> list[tuple[int, int]]:
        size = channels // self.groups
        bounds, start = [], 0
        for g in range(self.groups):
            end = channels if g == self.groups - 1 else start + size
            bounds.append((start, end))
            start = end
        return bounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for (start, end), (dh, dw) in zip(self.group_bounds(x.shape[-1]), self._DIRECTIONS):
            part = x[..., start:end]
            if dh or dw:
                part = torch.roll(part, shifts=(dh * self.step, dw * self.step), dims=(1, 2))
                if self.mode == "zero":
                    part = _zero_wrapped(part, dh * self.step, dw * self.step)
            parts.append(part)
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, mode={self.mode}, step={self.step}"


def _zero_wrapped(x: torch.Tensor, dh: int, dw: int) -> torch.Tensor:
    """Zero the rows/columns that `torch.roll` wrapped around (turns a roll into a zero-padded shift)."""
    x = x.clone()
    if dh > 0:
        x[:, :dh] = 0
    elif dh < 0:
        x[:, dh:] = 0
    if dw > 0:
        x[:, :, :dw] = 0
    elif dw < 0:
        x[:, :, dw:] = 0
    return x


class BetaAbs(nn.Module):
    """|x| on the first round(beta * C) channels, identity on the rest.

    Every output coordinate depends on one input coordinate with slope +-1, so the map is 1-Lipschitz
    and preserves gradient norms (beta = 0.5 is LiResNet's HalfAbs).
    """

    def __init__(self, beta: float = 0.5):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"BetaAbs beta={beta}: must be in [0, 1]")
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(round(self.beta * x.shape[-1]))
        if k == 0:
            return x
        return torch.cat([x[..., :k].abs(), x[..., k:]], dim=-1)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class L2SpatialPool(nn.Module):
    """Per channel sqrt(sum_{h,w} x^2): (B, H, W, C) -> (B, C).

    1-Lipschitz as a map of the whole feature map (reverse triangle inequality per channel). Average
    pooling would be 1/sqrt(HW)-Lipschitz-inconsistent with the certificate unless rescaled; we never use it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x, ord=2, dim=(1, 2))


class Patchify(nn.Module):
    """Space-to-depth: (B, C, H, W) -> (B, H/p, W/p, C p^2). A permutation of coordinates."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"


class LipNeXtBlock(nn.Module):
    """shift -> expand (isometry d -> k d) -> beta-Abs -> contract (co-isometry k d -> d).

    With `residual_alpha = a` in (0, 1]: `(1 - a) x + a block(x)`, a convex combination of two
    1-Lipschitz maps, hence 1-Lipschitz. a = 1 is the plain (non-residual) block.
    """

    def __init__(self, width: int, expansion: int, beta: float, shift_groups: int, shift_mode: str,
                 residual_alpha: float):
        super().__init__()
        if not 0.0 < residual_alpha <= 1.0:
            raise ValueError(f"residual_alpha={residual_alpha}: must be in (0, 1]")
        self.shift = SpatialShift(shift_groups, shift_mode)
        self.expand = OrthogonalProjection(width, width * expansion)
        self.act = BetaAbs(beta)
        self.contract = OrthogonalProjection(width * expansion, width)
        self.residual_alpha = residual_alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.contract(self.act(self.expand(self.shift(x))))
        a = self.residual_alpha
        return y if a == 1.0 else (1.0 - a) * x + a * y


def gram_minus_identity(weight: torch.Tensor) -> torch.Tensor:
    """G - I in fp64, G the Gram matrix of the smaller side (W^T W for tall, W W^T for wide): zero iff
    W is (semi-)orthogonal, and ||W||_2^2 = lambda_max(G)."""
    w = weight.detach().to(torch.float64)
    gram = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()
    return gram - torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)


def orthogonality_error(weight: torch.Tensor) -> float:
    """max |G - I| (see `gram_minus_identity`)."""
    return float(gram_minus_identity(weight).abs().max())


def fan_flops(d_in: int, d_out: int, tokens: int) -> int:
    """Multiply-adds of a per-token matmul, counted as 2 FLOPs each."""
    return 2 * d_in * d_out * tokens


__all__ = [
    "OrthogonalProjection", "SpatialShift", "BetaAbs", "L2SpatialPool", "Patchify", "LipNeXtBlock",
    "orthogonality_error", "gram_minus_identity", "fan_flops", "SHIFT_MODES", "manifold_parameters",
]


def manifold_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every (semi-)orthogonal matrix in `model`, in module order."""
    return [(f"{name}.weight" if name else "weight", m.weight)
            for name, m in model.named_modules() if getattr(m, "manifold", False)]
