"""Load a model to certify from a checkpoint URL, and verify its weights before any radius is trusted.

CKPT is either an exported model (`lipnext_scale.ckpt.export`, recognised by its manifest.json) or a
ZeRO-3 training checkpoint (or a run directory: its newest checkpoint, `ckpt.resolve_checkpoint`, the
resolver `lipnext export` uses too), consolidated by `lipnext_scale.ckpt.consolidate_checkpoint`.
Verification (paper.md B.1): the orthogonality error of every (semi-)orthogonal matrix and the rigorous
Lipschitz bound of the feature map. A bound above 1 + tol is refused unless `allow_approx`, in which case
radii are divided by it. Within tolerance we still divide by max(1, bound): it costs at most `tol` of a
radius and keeps every certificate rigorous.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from lipnext_scale.errors import LipnextError


class CertifyError(LipnextError, RuntimeError):
    """The certification job cannot run as asked; the message names the input and the fix."""


class CertifyRefused(CertifyError):
    """The weights are too far from orthogonal for the certificate to be trusted."""


@dataclass
class Verification:
    lipschitz_bound: float          # rigorous bound of the feature map's Lipschitz constant
    lipschitz_used: float           # what radii are divided by: max(1, bound)
    approx: bool                    # bound > 1 + tol, accepted because allow_approx
    max_orthogonality_error: float
    tol: float
    orthogonality_errors: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        worst = sorted(self.orthogonality_errors.items(), key=lambda kv: -kv[1])[:5]
        return {"lipschitz_bound": self.lipschitz_bound, "lipschitz_used": self.lipschitz_used,
                "approx": self.approx, "lipschitz_tol": self.tol,
                "max_orthogonality_error": self.max_orthogonality_error,
                "worst_matrices": dict(worst), "num_matrices": len(self.orthogonality_errors)}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: dict
    weights_sha256: str
    kind: str  # "exported" | "training"
    url: str   # the checkpoint read: for a training run directory, its newest step_* checkpoint


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, fp32 bytes), the same whichever format
    or world size they were stored in."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _read_state(ckpt_url: str) -> tuple[dict[str, torch.Tensor], dict, str, str]:
    """(state_dict, config, kind, the checkpoint URL actually read)."""
    from lipnext_scale.ckpt import (
        CheckpointError, ExportError, consolidate_checkpoint, is_exported, load_exported, resolve_checkpoint,
    )
    from lipnext_scale.storage import exists

    if not exists(ckpt_url, CertifyError):
        raise CertifyError(f"checkpoint {ckpt_url!r} does not exist; pass a training checkpoint directory "
                           "or a `lipnext export` output")
    if is_exported(ckpt_url):
        try:
            state_dict, config = load_exported(ckpt_url)
        except ExportError as e:
            raise CertifyError(f"cannot load exported model: {e}") from None
        return state_dict, config, "exported", ckpt_url
    try:
        ckpt_url = resolve_checkpoint(ckpt_url)  # a run directory: its newest checkpoint, never an older one
    except CheckpointError as e:
        raise CertifyError(str(e)) from None
    try:
        state_dict, config = consolidate_checkpoint(ckpt_url)
    except Exception as e:  # its errors name the file; we add which argument it came from
        raise CertifyError(f"cannot load training checkpoint {ckpt_url!r}: {e}") from None
    return state_dict, config, "training", ckpt_url


def load_model(ckpt_url: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model a checkpoint's config describes and load its weights (fp32, eval mode)."""
    from lipnext_scale.ckpt import ExportError, check_state_dict, model_kwargs
    from lipnext_scale.model import create_model

    state_dict, config, kind, url = _read_state(ckpt_url)
    try:
        check_state_dict(state_dict, config, repr(ckpt_url))
        name, kwargs = model_kwargs(config)
    except ExportError as e:
        raise CertifyError(str(e)) from None
    state_dict = {k: v.to(torch.float32) for k, v in state_dict.items()}
    model = create_model(name, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device=device, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return LoadedModel(model, config, state_dict_sha256(state_dict), kind, url)


def verify_model(model: torch.nn.Module, lipschitz_tol: float, allow_approx: bool) -> Verification:
    """Check the weights before trusting them; raise CertifyRefused when the bound exceeds 1 + tol."""
    from lipnext_scale.model import manifold_parameters, orthogonality_error
    from lipnext_scale.model.lipschitz import rigorous_lipschitz_bound

    errors = {name: orthogonality_error(w) for name, w in manifold_parameters(model)}
    bound = rigorous_lipschitz_bound(model)
    worst = max(errors.values(), default=0.0)
    approx = not bound <= 1.0 + lipschitz_tol  # `not <=` so that a NaN bound is refused too
    if approx and not (allow_approx and bound == bound and bound < float("inf")):
        worst_name = max(errors, key=errors.get) if errors else "-"
        raise CertifyRefused(
            f"the weights are not orthogonal enough to certify: rigorous Lipschitz bound {bound:.6g} > "
            f"1 + tol = {1 + lipschitz_tol:.6g} (worst matrix {worst_name}, max |W^T W - I| = {worst:.3g}). "
            "Re-orthogonalise the checkpoint, raise certify.lipschitz_tol, or pass --allow-approx to "
            "certify with radii divided by the bound")
    return Verification(bound, max(1.0, bound), approx, worst, lipschitz_tol, errors)
