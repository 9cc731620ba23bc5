"""`ManifoldOptimizer`: single-process training of a LipNeXt (paper.md B.8).

Every `manifold_parameters(model)` matrix gets Riemannian momentum + a retraction (fp32 master, also when
the model is bf16); every other trainable parameter gets torch's AdamW. Both groups follow
`lr_multiplier` from the optimizer's own step counter. A step with any NaN/Inf gradient is skipped
whole, counted in `.skipped_steps` and logged.

Gradient clipping (`optim.grad_clip > 0`): each group is clipped by its own global norm, the manifold
group here (and by `ShardedManifoldStep` under ZeRO-3), the Euclidean group here (and by DeepSpeed's
`gradient_clipping` under ZeRO-3, since the manifold step zeroes the manifold grads it consumed).

`state_dict()` is keyed by parameter name, so it loads into a model built anywhere (and its `momentum`
section is the format `ShardedManifoldStep` saves and loads, at any world size).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lipnext_scale.model.layers import manifold_parameters
from lipnext_scale.optim.manifold import check_manifold_parameter, riemannian_momentum_step
from lipnext_scale.optim.schedule import lr_multiplier

log = logging.getLogger(__name__)

STATE_FORMAT = "lipnext-manifold-optim/1"


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(manifold, euclidean) named trainable parameters; manifold ones are validated as matrices."""
    manifold = [(n, p) for n, p in manifold_parameters(model) if p.requires_grad]
    ids = {id(p) for _, p in manifold}
    euclid = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    return manifold, euclid


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Scale that brings a gradient of norm `total_norm` down to `max_norm` (1 when clipping is off)."""
    if max_norm <= 0 or total_norm <= max_norm:
        return 1.0
    return max_norm / (total_norm + 1e-6)


def check_state_format(state: dict, where: str) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where}: optimizer state has format {got!r}, expected {STATE_FORMAT!r}; "
                         "pass the dict saved by ManifoldOptimizer/ShardedManifoldStep.state_dict()")


def check_momentum_names(momentum: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    unknown = sorted(set(momentum) - set(shapes))
    if unknown:
        raise ValueError(f"{where}: momentum for unknown parameter(s) {unknown[:5]}; the checkpoint was "
                         "saved from a different model; build the model it was trained with")
    for name, buf in momentum.items():
        if tuple(buf.shape) != tuple(shapes[name]):
            raise ValueError(f"{where}: momentum of {name!r} has shape {tuple(buf.shape)}, the parameter "
                             f"has {tuple(shapes[name])}; the checkpoint belongs to another model size")


class ManifoldOptimizer(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, cfg):
        cfg.validate()
        self.cfg = cfg
        manifold, euclid = split_parameters(model)
        for name, p in manifold:
            check_manifold_parameter(name, tuple(p.shape), p.detach())
        groups = []
        if manifold:
            groups.append({"params": [p for _, p in manifold], "names": [n for n, _ in manifold],
                           "kind": "manifold", "lr": cfg.lr, "base_lr": cfg.lr})
        euclid_group = None
        if euclid:
            euclid_group = {"params": [p for _, p in euclid], "names": [n for n, _ in euclid],
                            "kind": "euclidean", "lr": cfg.euclid_lr, "base_lr": cfg.euclid_lr}
            groups.append(euclid_group)
        if not groups:
            raise ValueError("ManifoldOptimizer: the model has no trainable parameters")
        super().__init__(groups, defaults={})
        # torch's AdamW shares the Euclidean group dict, so lr changes made here reach it.
        self._adamw = (torch.optim.AdamW([euclid_group], lr=cfg.euclid_lr, betas=cfg.betas,
                                         weight_decay=cfg.weight_decay) if euclid_group else None)
        self.step_count = 0  # applied steps: drives the schedule
        self.skipped_steps = 0
        self.ns_stats: dict = {}

    # ---------------------------------------------------------------------------------------------

    def _groups(self, kind: str) -> list[dict]:
        return [g for g in self.param_groups if g.get("kind") == kind]

    def _grads_finite(self) -> tuple[bool, list[str]]:
        flags, names = [], []
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"]):
                if p.grad is not None:
                    flags.append(torch.isfinite(p.grad).all())
                    names.append(name)
        if not flags:
            return True, []
        ok = torch.stack(flags)
        if bool(ok.all()):
            return True, []
        return False, [n for n, f in zip(names, ok.tolist()) if not f]

    def _clip(self, group: dict) -> None:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if self.cfg.grad_clip > 0 and grads:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            coef = clip_coefficient(norm, self.cfg.grad_clip)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        finite, bad = self._grads_finite()
        if not finite:
            self.skipped_steps += 1
            log.warning("ManifoldOptimizer: skipped step %d (skipped so far: %d): non-finite gradient in %s",
                        self.step_count, self.skipped_steps, ", ".join(bad[:5]))
            return loss
        mult = lr_multiplier(self.step_count, self.cfg)
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * mult
            self._clip(group)
        exact = self.cfg.reortho_every > 0 and (self.step_count + 1) % self.cfg.reortho_every == 0
        for group in self._groups("manifold"):
            for p in group["params"]:
                if p.grad is not None:
                    self._manifold_update(p, group["lr"], exact)
        if self._adamw is not None:
            self._adamw.step()
        self.step_count += 1
        return loss

    def _manifold_update(self, p: nn.Parameter, lr: float, exact: bool) -> None:
        state = self.state[p]
        master = state.get("master")  # an fp32 master only for low-precision params
        if master is None and p.dtype not in (torch.float32, torch.float64):
            master = state["master"] = p.detach().float()
        x = p if master is None else master
        new, buf = riemannian_momentum_step(
            x, p.grad, state.get("momentum_buffer"), lr=lr, momentum=self.cfg.momentum,
            method=self.cfg.retraction, ns_iters=self.cfg.ns_iters, exact=exact, stats=self.ns_stats)
        state["momentum_buffer"] = buf
        if master is not None:
            master.copy_(new)
        p.copy_(new)

    # ---------------------------------------------------------------------------------------------

    def named_manifold_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for g in self._groups("manifold") for n, p in zip(g["names"], g["params"])]

    def state_dict(self) -> dict:
        momentum = {n: self.state[p]["momentum_buffer"].detach().clone()
                    for n, p in self.named_manifold_params() if "momentum_buffer" in self.state[p]}
        euclid = {}
        for g in self._groups("euclidean"):
            for n, p in zip(g["names"], g["params"]):
                if p in self._adamw.state and self._adamw.state[p]:
                    euclid[n] = {k: (v.detach().clone() if torch.is_tensor(v) else v)
                                 for k, v in self._adamw.state[p].items()}
        masters = {n: self.state[p]["master"].detach().clone()
                   for n, p in self.named_manifold_params() if "master" in self.state[p]}
        return {"format": STATE_FORMAT, "step": self.step_count, "skipped_steps": self.skipped_steps,
                "momentum": momentum, "euclidean": euclid, "masters": masters}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()` (also the manifold-only dict of `ShardedManifoldStep`: Adam state then starts fresh)."""
        check_state_format(state_dict, "ManifoldOptimizer.load_state_dict")
        named = dict(self.named_manifold_params())
        momentum = state_dict.get("momentum", {})
        check_momentum_names(momentum, {n: tuple(p.shape) for n, p in named.items()},
                             "ManifoldOptimizer.load_state_dict")
        euclid_named = {n: p for g in self._groups("euclidean") for n, p in zip(g["names"], g["params"])}
        euclid = state_dict.get("euclidean", {})
        unknown = sorted(set(euclid) - set(euclid_named))
        if unknown:
            raise ValueError(f"ManifoldOptimizer.load_state_dict: Adam state for unknown parameter(s) "
                             f"{unknown[:5]}; the checkpoint was saved from a different model")
        check_momentum_names(state_dict.get("masters", {}), {n: tuple(p.shape) for n, p in named.items()},
                             "ManifoldOptimizer.load_state_dict (fp32 masters)")
        for key, section in (("momentum_buffer", momentum), ("master", state_dict.get("masters", {}))):
            for name, value in section.items():
                p = named[name]
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                self.state[p][key] = value.detach().to(device=p.device, dtype=dtype).clone()
        for name, st in euclid.items():
            p = euclid_named[name]
            self._adamw.state[p] = {k: (v.detach().to(p.device).clone() if torch.is_tensor(v) else v)
                                    for k, v in st.items()}
        self.step_count = int(state_dict["step"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
