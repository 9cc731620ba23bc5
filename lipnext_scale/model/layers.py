"""LipNeXt layers: each one is 1-Lipschitz in the l2 norm by construction.

Feature maps are channels-last, (B, H, W, C): an orthogonal projection is then one matmul over the
last dimension and the spatial shift a copy of strided slices over dims 1 and 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipnext_scale.config import ShiftMode, choices


def orthogonal_(weight: torch.Tensor) -> torch.Tensor:
    """Fill a (d_out, d_in) matrix with a Haar-random (semi-)orthogonal one: QR of a Gaussian in fp64, then
    rounded to the storage dtype, so a fresh matrix is as orthogonal as its storage allows (an fp32 QR leaves
    ||W^T W - I||_F ~ 5e-5 at width 4096, 20x the fp32 rounding floor, and 1B/2B paths of 97/193 matrices
    then fail certification's tolerance before training). No-op on meta."""
    if weight.is_meta:  # big models are sized on `meta`; nothing to initialise
        return weight
    with torch.no_grad():
        w = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
        nn.init.orthogonal_(w)
        weight.copy_(w)
    return weight


class OrthogonalProjection(nn.Module):
    """Per-pixel channel mix `y = x W^T` by a (semi-)orthogonal W of shape (d_out, d_in).

    d_out == d_in: orthogonal, norm preserving. d_out > d_in: an isometry (W^T W = I), norm preserving.
    d_out < d_in: a co-isometry (W W^T = I), norm non-increasing. Either way ||W||_2 = 1.
    The weight lives on its manifold: the manifold optimizer keeps it there, nothing re-parameterises
    it in the forward pass (paper: "constraint-free").
    """

    manifold_names = ("weight",)  # parameters the manifold optimizer and the Lipschitz checks own

    def __init__(self, d_in: int, d_out: int, device=None, dtype=None):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.weight = nn.Parameter(torch.empty(d_out, d_in, device=device, dtype=dtype))
        orthogonal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # one GEMM over all leading dims (x @ W.t() is slower on CPU)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}"


SHIFT_MODES = choices(ShiftMode)
# (dh, dw) of the shifted groups, in channel order: up, down, left, right; the remaining channels stay.
SHIFT_DIRECTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def shift_group_size(channels: int, alpha: float, align: int = 8) -> int:
    """Channels moved in each of the 4 directions: floor(alpha * C), rounded down to a multiple of `align`
    when that leaves at least `align` (aligned slices for vectorised copies and bf16 tensor-core tiles)."""
    size = int(alpha * channels)
    return size - size % align if size >= align else size


def _shift_into(out: torch.Tensor, x: torch.Tensor, size: int, sign: int, circular: bool) -> None:
    """out[..., group g] = x[..., group g] moved one pixel in direction sign * SHIFT_DIRECTIONS[g]; the rest
    of the channels copied unchanged. Each element is read once and written once (no roll, no cat)."""
    lo = 0
    for dh, dw in SHIFT_DIRECTIONS:
        dh, dw = sign * dh, sign * dw
        src, dst = x[..., lo:lo + size], out[..., lo:lo + size]
        dim = 1 if dh else 2
        step = dh or dw
        n = x.shape[dim]
        # roll semantics: dst[i] = src[i - step], the `step` wrapped rows from the other end (or zeros)
        body_dst, body_src = (dst.narrow(dim, 1, n - 1), src.narrow(dim, 0, n - 1)) if step > 0 else \
            (dst.narrow(dim, 0, n - 1), src.narrow(dim, 1, n - 1))
        edge_dst, edge_src = (dst.narrow(dim, 0, 1), src.narrow(dim, n - 1, 1)) if step > 0 else \
            (dst.narrow(dim, n - 1, 1), src.narrow(dim, 0, 1))
        body_dst.copy_(body_src)
        if circular:
            edge_dst.copy_(edge_src)
        else:
            edge_dst.zero_()
        lo += size
    out[..., lo:].copy_(x[..., lo:])


def _shifted(x: torch.Tensor, size: int, sign: int, circular: bool) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _shift_into(out, x, size, sign, circular)
    return out


def shift_reference(x: torch.Tensor, size: int, sign: int = 1, circular: bool = True) -> torch.Tensor:
    """The same shift from out-of-place ops (roll, slice, cat): the readable definition, which tests
    compare the one-pass version against, and which composes with every torch.func transform."""
    parts, lo = [], 0
    for dh, dw in SHIFT_DIRECTIONS:
        dh, dw = sign * dh, sign * dw
        part = torch.roll(x[..., lo:lo + size], shifts=(dh, dw), dims=(1, 2))
        if not circular:
            h, w = x.shape[1], x.shape[2]
            rows = torch.arange(h, device=x.device).view(h, 1, 1)
            cols = torch.arange(w, device=x.device).view(1, w, 1)
            wrapped = (rows == (0 if dh > 0 else h - 1)) if dh else (cols == (0 if dw > 0 else w - 1))
            part = part.masked_fill(wrapped, 0)
        parts.append(part)
        lo += size
    return torch.cat(parts + [x[..., lo:]], dim=-1)


class _ShiftFunction(torch.autograd.Function):
    """The shift as one pass forward and one pass backward. It is linear, and its adjoint is the opposite
    shift (for the circular mode the inverse permutation; for zero padding the opposite zero-padded
    shift), so autograd saves nothing and keeps no per-group intermediates. `jvp` makes it usable under
    torch.func (the Jacobian checks use forward-mode AD)."""

    @staticmethod
    def forward(x: torch.Tensor, size: int, circular: bool) -> torch.Tensor:
        return _shifted(x, size, 1, circular)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.size, ctx.circular = inputs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # double backward, or inside a torch.func transform: stay functional
            return shift_reference(grad, ctx.size, -1, ctx.circular), None, None
        return _shifted(grad, ctx.size, -1, ctx.circular), None, None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, *_):  # only the Lipschitz checks use forward mode: no hot path
        return shift_reference(tangent, ctx.size, 1, ctx.circular)


class SpatialShift(nn.Module):
    """Parameter-free spatial mixing (paper: Spatial Shift Module): alpha * C channels move one pixel up,
    alpha * C down, alpha * C left, alpha * C right; the other (1 - 4 alpha) C stay.

    `mode="circular"` wraps around: a permutation of coordinates, exactly norm preserving (paper: circular
    padding plus an explicit positional encoding beats zero padding). `mode="zero"` drops what is shifted
    out: norm non-increasing.
    """

    def __init__(self, alpha: float = 0.125, mode: str = "circular", align: int = 8):
        super().__init__()
        if not 0.0 < alpha <= 0.25:
            raise ValueError(f"SpatialShift alpha={alpha}: the share of channels per direction must be in "
                             "(0, 1/4] (the paper uses 1/8 or 1/16)")
        if mode not in SHIFT_MODES:
            raise ValueError(f"SpatialShift mode={mode!r}: choose one of {', '.join(SHIFT_MODES)}")
        self.alpha, self.mode, self.align = alpha, mode, align

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = shift_group_size(x.shape[-1], self.alpha, self.align)
        if size == 0:
            return x
        return _ShiftFunction.apply(x, size, self.mode == "circular")

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, mode={self.mode}"


def _flip_where(t: torch.Tensor, negative: torch.Tensor, k: int) -> torch.Tensor:
    """t with the first k channels negated where `negative` (the derivative of |x| there)."""
    if torch.is_grad_enabled():  # double backward, or inside a torch.func transform: stay functional
        return torch.cat([torch.where(negative, -t[..., :k], t[..., :k]), t[..., k:]], dim=-1)
    out = t.clone(memory_format=torch.contiguous_format)
    head = out[..., :k]
    head.copy_(torch.where(negative, -head, head))
    return out


class _BetaAbsFunction(torch.autograd.Function):
    """|x| on the first k channels, identity on the rest, in one copy (no slice + cat); backward multiplies
    those k channels of the gradient by sign(x), from a saved bool mask (1 byte per element of k channels,
    instead of keeping the bf16/fp32 input alive)."""

    @staticmethod
    def forward(x: torch.Tensor, k: int) -> torch.Tensor:
        y = x.clone(memory_format=torch.contiguous_format)
        y[..., :k].abs_()
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.k = inputs
        negative = x[..., :ctx.k] < 0
        ctx.save_for_backward(negative)
        ctx.save_for_forward(negative)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (negative,) = ctx.saved_tensors
        return _flip_where(grad, negative, ctx.k), None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _):
        (negative,) = ctx.saved_tensors
        return _flip_where(tangent, negative, ctx.k)


class BetaAbs(nn.Module):
    """beta-Abs (paper): |x_i| for the first round(beta * C) channels, x_i for the rest.

    Every output coordinate depends on one input coordinate with slope +-1, so the map is 1-Lipschitz and
    norm preserving (beta = 0.5 relates to MinMax by an orthogonal change of basis).
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
        if not torch.is_grad_enabled():  # inference (certification): no sign mask to build and keep
            y = x.clone(memory_format=torch.contiguous_format)
            y[..., :k].abs_()
            return y
        return _BetaAbsFunction.apply(x, k)

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
    """The paper's block, `Z = beta_Abs(M R^T S(R(X + p)) + b)`, channels-last.

    p (grid, grid, 1): a learnable positional encoding, one value per position broadcast over channels
    (circular shifts carry no position; p gives it back). R (`rot`), M (`mix`): C x C orthogonal, on the
    manifold. S: the spatial shift. b: a bias. Each step is a translation, an orthogonal map or a
    permutation, and beta-Abs is 1-Lipschitz, so the block is 1-Lipschitz.

    M R^T is applied as one matrix: the product costs C^3 once per forward, against one tokens x C^2 matmul
    saved on the activations (and two in backward), and the bias rides in the same addmm. R and M are
    parameters of the block itself, not of sub-modules: ZeRO-3 gathers a module's own parameters for its
    forward, and the fused product needs both at once.
    """

    manifold_names = ("rot", "mix")

    def __init__(self, width: int, grid: int, alpha: float = 0.125, beta: float = 0.5,
                 shift_mode: str = "circular", positional: bool = True):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(grid, grid, 1)) if positional else None
        self.rot = orthogonal_(nn.Parameter(torch.empty(width, width)))  # R
        self.mix = orthogonal_(nn.Parameter(torch.empty(width, width)))  # M
        self.bias = nn.Parameter(torch.zeros(width))
        self.shift = SpatialShift(alpha, shift_mode)
        self.act = BetaAbs(beta)

    def lipschitz_path(self) -> list[str]:
        """Names (relative to the block) of the matrices applied in order: R, then R^T, then M."""
        return ["rot", "rot", "mix"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos is not None:
            x = x + self.pos
        u = self.shift(F.linear(x, self.rot))  # S(R x)
        return self.act(F.linear(u, self.mix @ self.rot.t(), self.bias))  # beta_Abs((M R^T) u + b)


class NormalizedLinear(nn.Module):
    """The head with last-layer normalisation (LiResNet++): logit j = <w_j / ||w_j||, x> + b_j.

    The raw parameter is called `direction` on purpose: only `rows()` are the weights the logits use, and
    certification must read those (there is no `.weight` to pick up by mistake).
    """

    def __init__(self, d_in: int, num_classes: int):
        super().__init__()
        self.d_in, self.num_classes = d_in, num_classes  # ZeRO-3 empties parameter shapes: keep our own
        self.direction = nn.Parameter(torch.empty(num_classes, d_in))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        if not self.direction.is_meta:
            nn.init.normal_(self.direction)

    def rows(self) -> torch.Tensor:
        """The unit-norm rows the forward pass multiplies by (normalised in fp32, returned in the
        parameter's dtype, exactly as `forward` uses them)."""
        d = self.direction
        return F.normalize(d.float(), dim=1).to(d.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rows().to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, num_classes={self.num_classes}"


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


def manifold_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every (semi-)orthogonal matrix in `model`, in module order: the parameters a
    module lists in its `manifold_names`."""
    return [(f"{prefix}.{attr}" if prefix else attr, getattr(m, attr))
            for prefix, m in model.named_modules() for attr in getattr(m, "manifold_names", ())]


__all__ = [
    "orthogonal_", "OrthogonalProjection", "SpatialShift", "BetaAbs", "L2SpatialPool", "Patchify", "LipNeXtBlock",
    "NormalizedLinear", "orthogonality_error", "gram_minus_identity", "fan_flops",
    "SHIFT_MODES", "SHIFT_DIRECTIONS", "shift_group_size", "shift_reference", "manifold_parameters",
]
