"""Floating-point error allowances of a certificate: what the radius subtracts so rounding cannot fool it.

What is certified is the prediction of the model as it runs, `model(x).argmax()` in fp32, at every x'
within the radius. The job computes the features phi~(x) in fp32 (the same kernels as the forward) and
the head in float64 from them, with exactly the rows the forward multiplies by (`head.rows()`, fp32,
cast to float64 without rounding). With gap_j = f_y - f_j, d_j = ||w_y - w_j|| and L the rigorous
Lipschitz bound of the exact feature map phi:

    exact gap at x    >= computed float64 gap - err64_j - d_j E        (E bounds ||phi~ - phi||)
    exact gap at x'   >= exact gap at x - L d_j ||x' - x||
    fp32 gap at x'    >= exact gap at x' - d_j E - H32_j               (the deployed forward)

so the fp32 prediction at x' is still y whenever ||x' - x|| < (gap_j - err64_j - H32_j) / (L d_j) - 2E / L
for every j. That is the radius (`certify.certified_radius` with the allowances of `batch_allowances`).
E and the head's error grow with activation norms; they are evaluated per sample from the norms its own
forward produced (block inputs, features), raised by L r to hold at every x' within r of x, where
r is the radius in exact arithmetic (an upper bound of the final one).
Rows with d_j = 0 never move the gap: such a pair is harmless iff gap_j > err64_j + H32_j, else the
point is not certified at all (radius -inf).

Rigorous: err64_j, the float64 head's error, gamma_{d+2}(2 ||w|| ||phi|| + |b_y| + |b_j|) with
gamma_n = n u64 / (1 - n u64) (Higham, Accuracy and Stability, Thm 3.1: any summation order, FMA or
not); the norms at x' (at most those at x plus L ||x' - x||: every prefix of the network is L-Lipschitz,
as each matrix-norm bound is >= 1 and their product is L); the propagation: an error made at one layer
reaches the features through the rest of the network, which is L-Lipschitz at most.

Stated (not proven): the local error of each fp32 operation. Worst-case bounds grow like n u per
dot product of length n and are useless here (for C = 2048 and 97 matmuls they exceed the features'
norm). We use the probabilistic model of Higham & Mary (SIAM J. Sci. Comput. 2019): rounding errors
are mean-zero and uncorrelated. For y = W a in fp32 with ||W||_2 <= 1, each of the n - 1 additions per
output adds an error of at most u |s| for a partial sum s over a subset S of the terms, and
sum_i s_i^2 = ||W[:, S] a_S||^2 <= ||a||^2, so E ||y~ - y||^2 <= (n + 1) u^2 ||a||^2: an RMS bound of
u sqrt(n + 1) ||a||, which we multiply by SAFETY (4). The fp32 product M R^T of a paper block counts as
one more such matmul on the same activation, and the fp32 head as one dot product of length d + 1 per
logit (the bias in its partial sums). Additions of p and b are one rounding each (u |result|, rigorous).
The bound is checked against fp32-vs-float64 measurements in tests/unit/test_certify_fp_error.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

U32 = 2.0 ** -24  # unit roundoff of fp32, round to nearest
U64 = 2.0 ** -53
SAFETY = 4.0  # multiples of the RMS rounding error the stated bound allows (see the module docstring)


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): the worst-case relative error of an n-term sum or dot product."""
    if n * u >= 1:
        return math.inf
    return n * u / (1 - n * u)


def matmul_error(n: int, input_norm: float, u: float = U32, safety: float = SAFETY) -> float:
    """Stated l2 error of y = W a in floating point (||W||_2 <= 1, length-n dot products, ||a|| <= input_norm):
    `safety` times the RMS bound u sqrt(n + 1) ||a|| of the uncorrelated-rounding model."""
    return safety * u * math.sqrt(n + 1) * input_norm


def input_norm_bound(input_mean: tuple[float, ...], image_size: int) -> float:
    """max ||x - mean||_2 over images x in [0, 1]^(3 x H x W): each pixel is at most max(m, 1 - m) away."""
    per_pixel = sum(max(m, 1.0 - m) ** 2 for m in input_mean)
    return math.sqrt(per_pixel * image_size * image_size)


def _block_coefficients(block: torch.nn.Module, tokens: int, lipschitz: float) -> tuple[float, float, float]:
    """(alpha, beta, translation): one block's local error is <= alpha * a + beta for an input of norm <= a,
    and its output norm is <= L (a + translation)."""
    from lipnext_scale.model.layers import LipNeXtBlock

    k = SAFETY * U32
    if isinstance(block, LipNeXtBlock):
        c = block.rot.shape[0]
        pos = 0.0 if block.pos is None else math.sqrt(c) * float(block.pos.detach().double().norm())
        bias = math.sqrt(tokens) * float(block.bias.detach().double().norm())
        # x + p (one rounding), R (x + p), the fp32 product M R^T and (M R^T) u + b (bias in the partial
        # sums), the bias addition's own rounding; R, the shift and M R^T grow norms by <= L in all.
        per_a = (U32 if block.pos is not None else 0.0) + k * math.sqrt(c + 1) + lipschitz * (
            2 * k * math.sqrt(c + 1) + U32)
        alpha = per_a
        beta = (U32 if block.pos is not None else 0.0) * pos + k * math.sqrt(c + 1) * pos + lipschitz * (
            2 * k * math.sqrt(c + 1) + U32) * (pos + bias)
        return alpha, beta, pos + bias
    raise TypeError(f"no floating-point error model for block type {type(block).__name__}; add one to "
                    "lipnext_scale/certify/fp_error.py before certifying this model")


@dataclass(frozen=True)
class FloatErrorModel:
    """The allowances of one model, as functions of the activation norms a sample produces.

    Local errors: `stem` per unit of ||x - mean||, alpha_b a_b + beta_b for block b given its input norm
    a_b, `pool` per unit of ||phi||; E = L sqrt(sum of squares) (errors of different layers are
    uncorrelated in the same model, so variances add; each travels through an L-Lipschitz rest).
    Head: the gap (y, j) is off by at most head_per_norm * ||phi|| + head_pair[y, j]."""

    lipschitz: float
    stem: float
    blocks: tuple[tuple[float, float], ...]
    translations: tuple[float, ...]
    pool: float
    input_norm_max: float
    head_per_norm: float
    head_pair: torch.Tensor

    def feature_error(self, input_norm, block_input_norms, feature_norm, slack=0.0) -> torch.Tensor:
        """(B,) E for the norms measured at B points ((B,) tensors or floats), each raised by `slack`
        (L r to cover every x' with ||x' - x|| <= r). One vectorised expression: it runs per batch."""
        norms = torch.stack(torch.broadcast_tensors(*[torch.as_tensor(n, dtype=torch.float64) for n in
                                                      (input_norm, *block_input_norms, feature_norm)]), dim=-1)
        coef = torch.tensor((self.stem, *(a for a, _ in self.blocks), self.pool), dtype=torch.float64)
        offset = torch.tensor((0.0, *(b for _, b in self.blocks), 0.0), dtype=torch.float64)
        slack = torch.as_tensor(slack, dtype=torch.float64)
        terms = coef * (norms + (slack[..., None] if slack.dim() else slack)) + offset
        return self.lipschitz * terms.square().sum(dim=-1).sqrt()

    def uniform(self) -> tuple[float, float]:
        """(E, Phi) over the whole pixel box: activation norms from ||x - mean|| <= input_norm_max and the
        translations (every matrix-norm bound is >= 1 and their product <= L, so any prefix grows norms
        by <= L). Rigorous norms, no measurement: what the report states for the model."""
        n0, norms, t = self.input_norm_max, [], 0.0
        for added in self.translations:
            norms.append(self.lipschitz * (n0 + t))
            t += added
        phi = self.lipschitz * (n0 + t)
        return float(self.feature_error(n0, norms, phi)), phi

    def as_dict(self) -> dict:
        e, phi = self.uniform()
        off = self.head_pair[~torch.eye(len(self.head_pair), dtype=torch.bool)]
        return {"feature_error_uniform": e, "feature_norm_bound": phi, "safety": SAFETY,
                "head_gap_error_uniform": self.head_per_norm * (phi + e) + (float(off.max()) if off.numel() else 0.0),
                "model": "stated: each fp32 operation's error <= SAFETY x its RMS under uncorrelated rounding; "
                         "rigorous: float64 head, norm bounds, propagation (lipnext_scale/certify/fp_error.py)"}


def float_error_model(model: torch.nn.Module, lipschitz: float) -> FloatErrorModel:
    """The allowances for a LipNeXt whose feature map is `lipschitz`-Lipschitz (the rigorous bound used);
    O(C^2 + parameters), once per model."""
    spec = model.spec
    k = SAFETY * U32
    coefficients = [_block_coefficients(b, spec.tokens, lipschitz) for b in model.blocks]
    rows = model.head.rows().detach().to("cpu", torch.float64)
    bias = model.head.bias.detach().to("cpu", torch.float64).abs()
    d = rows.shape[1]
    row_norm = float(rows.norm(dim=1).max()) * (1 + 1e-12)  # unit rows up to fp32 normalisation
    head = k * math.sqrt(d + 2) + gamma(d + 2, U64)  # the deployed fp32 head (stated) + the float64 one
    return FloatErrorModel(
        lipschitz=lipschitz,
        stem=U32 + lipschitz * k * math.sqrt(spec.stem_in + 1),  # x - mean, then the stem projection
        blocks=tuple((a, b) for a, b, _ in coefficients),
        translations=tuple(t for _, _, t in coefficients),
        pool=k * math.sqrt(spec.tokens + 1),  # L2 pooling: a sum of `tokens` squares per channel
        input_norm_max=input_norm_bound(tuple(spec.input_mean), spec.image_size),
        head_per_norm=head * 2 * row_norm,
        head_pair=head * (bias[:, None] + bias[None, :]),
    )


@dataclass
class Allowances:
    """What `certified_radius` subtracts for one batch (see `batch_allowances`)."""
    gap_error: torch.Tensor         # (C, C)
    sample_gap_error: torch.Tensor  # (B,)
    feature_error: torch.Tensor     # (B,): E(x) + E(x')


def batch_allowances(fem: FloatErrorModel, input_norm: torch.Tensor, block_input_norms: list[torch.Tensor],
                     feature_norm: torch.Tensor, radius_bound: torch.Tensor) -> Allowances:
    """Allowances for a batch from the norms its forward produced, valid for every x' within
    `radius_bound` of each point (the exact-arithmetic radius: the allowances only shrink it; capped
    at the pixel box's diameter). Norms at x' are at most the norms at x plus L ||x' - x|| plus the
    error of measuring them in fp32 (E(x))."""
    diameter = 2 * fem.input_norm_max
    r = torch.nan_to_num(radius_bound.to(torch.float64), posinf=diameter).clamp(0.0, diameter)
    e_here = fem.feature_error(input_norm, block_input_norms, feature_norm)
    slack = fem.lipschitz * r + e_here
    e_there = fem.feature_error(input_norm, block_input_norms, feature_norm, slack)
    return Allowances(fem.head_pair, fem.head_per_norm * (feature_norm + slack + e_there), e_here + e_there)
