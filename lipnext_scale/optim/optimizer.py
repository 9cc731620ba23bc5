"""`ManifoldOptimizer`: single-process training of a LipNeXt (paper.md A "Optimizer", B.5).

Every `manifold_parameters(model)` matrix is updated by `manifold_update` (fp32 master, also when the model
is bf16; same-shape matrices stacked into one batch); every other trainable parameter by NAdam or AdamW
(+ optional Lookahead, `euclidean.py`). Both groups follow `lr_multiplier` from the optimizer's own step
counter. A step with any NaN/Inf gradient is skipped whole, counted in `.skipped_steps` and logged.

Gradient clipping (`optim.grad_clip > 0`): each group is clipped by its own global norm, the manifold
group here (and by `ShardedManifoldStep` under ZeRO-3), the Euclidean group here (and by DeepSpeed's
`gradient_clipping` under ZeRO-3, since the manifold step zeroes the manifold grads it consumed).

`state_dict()` is keyed by parameter name, so it loads into a model built anywhere; its `manifold` section
(name -> {state key -> tensor}) is the format `ShardedManifoldStep` saves per owner and loads at any world size.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lipnext_scale.model.layers import manifold_parameters
from lipnext_scale.optim.euclidean import build_euclidean_optimizer
from lipnext_scale.optim.fast_exp import next_squaring_budget, window_scalars, window_summary
from lipnext_scale.optim.manifold import check_manifold_parameter
from lipnext_scale.optim.schedule import lr_multiplier
from lipnext_scale.optim.update import StepAt, manifold_update, state_shapes

log = logging.getLogger(__name__)

STATE_FORMAT = "lipnext-manifold-optim/2"
_OLD_FORMAT = "lipnext-manifold-optim/1"  # a `momentum` section (heavy-ball buffers) only


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(manifold, euclidean) named trainable parameters; manifold ones are validated as matrices."""
    manifold = [(n, p) for n, p in manifold_parameters(model) if p.requires_grad]
    ids = {id(p) for _, p in manifold}
    euclid = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    return manifold, euclid


def clip_coefficient(total_norm, max_norm: float):
    """Scale that brings a gradient of norm `total_norm` (a float or a device tensor: then no host read)
    down to `max_norm` (1 when clipping is off)."""
    if max_norm <= 0:
        return 1.0
    if torch.is_tensor(total_norm):
        return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    return 1.0 if total_norm <= max_norm else max_norm / (total_norm + 1e-6)


def check_state_format(state: dict, where: str) -> dict:
    """The manifold state section of a saved dict ({name: {key: tensor}}), also from the old momentum format."""
    fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
    if fmt == _OLD_FORMAT:
        return {n: {"momentum_buffer": m} for n, m in state.get("momentum", {}).items()}
    if fmt != STATE_FORMAT:
        raise ValueError(f"{where}: optimizer state has format {fmt!r}, expected {STATE_FORMAT!r}; "
                         "pass the dict saved by ManifoldOptimizer/ShardedManifoldStep.state_dict()")
    return state.get("manifold", {})


def check_manifold_state(manifold: dict, shapes: dict[str, tuple[int, int]], cfg, where: str) -> None:
    """Names, state keys and shapes must match the model and the config; a clear error names the mismatch."""
    unknown = sorted(set(manifold) - set(shapes))
    if unknown:
        raise ValueError(f"{where}: optimizer state for unknown parameter(s) {unknown[:5]}; the checkpoint was "
                         "saved from a different model; build the model it was trained with")
    for name, entry in manifold.items():
        want = state_shapes(shapes[name], cfg)
        extra = sorted(set(entry) - set(want))
        if extra:
            raise ValueError(f"{where}: {name!r} has optimizer state {extra} that optim.retraction="
                             f"{cfg.retraction!r}, optim.moments={cfg.moments!r} does not use; resume with the "
                             "optimizer settings of the checkpoint")
        for key, value in entry.items():
            if tuple(value.shape) != tuple(want[key]):
                raise ValueError(f"{where}: {key} of {name!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(want[key])}; the checkpoint belongs to another model size")


def _stack_state(states: list[dict], keys) -> dict:
    return {k: torch.stack([s[k] for s in states]) for k in keys if all(k in s for s in states)}


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
        # The Euclidean optimizer shares the Euclidean group dict, so lr changes made here reach it.
        self._euclid = build_euclidean_optimizer([euclid_group], cfg) if euclid_group else None
        self.step_count = 0  # applied steps: drives the schedule
        self.skipped_steps = 0
        self.ns_stats: dict = {}
        self._sync_next = False

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
        if bool(ok.all()):  # one host read per step
            return True, []
        return False, [n for n, f in zip(names, ok.tolist()) if not f]

    def _clip(self, group: dict) -> None:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if self.cfg.grad_clip > 0 and grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            coef = clip_coefficient(norm, self.cfg.grad_clip)  # a device scalar: no host read
            for g in grads:
                g.mul_(coef.to(g.dtype))

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
        for group in self._groups("manifold"):
            by_shape: dict[tuple, list[nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                self._manifold_update(shape, params, group["lr"])
        if self._euclid is not None:
            self._euclid.step()
        self._sync_next = False
        self.step_count += 1
        return loss

    def _manifold_update(self, shape: tuple, params: list[nn.Parameter], lr: float) -> None:
        """One stacked update of the same-shape matrices `params` (fp32 masters for low-precision params)."""
        for p in params:
            if "master" not in self.state[p] and p.dtype not in (torch.float32, torch.float64):
                self.state[p]["master"] = p.detach().float()
        points = [self.state[p].get("master", p) for p in params]
        keys = state_shapes(shape, self.cfg)
        state = _stack_state([self.state[p] for p in params], keys)
        new = manifold_update(torch.stack([x.detach() for x in points]), torch.stack([p.grad for p in params]),
                              state, StepAt(self.step_count, lr, self._sync_next), cfg=self.cfg, stats=self.ns_stats)
        for i, p in enumerate(params):
            for k, v in state.items():
                self.state[p][k] = v[i].clone()
            if "master" in self.state[p]:
                self.state[p]["master"].copy_(new[i])
            p.copy_(new[i])

    # ---------------------------------------------------------------------------------------------

    def request_lookahead_sync(self) -> None:
        """The next step ends with the Lookahead update of both groups (slow and fast weights synchronised): call
        it before the step that precedes an evaluation or a checkpoint."""
        self._sync_next = self.cfg.lookahead_k > 0
        if self._euclid is not None:
            self._euclid.request_lookahead_sync()

    def fast_exp_scalars(self) -> dict[str, float]:
        """FastExp branch shares and ||A||_F / rho quantiles since the last call (host reads: log steps only)."""
        if self.cfg.retraction != "fast_exp":
            return {}
        squarings = self.cfg.fast_exp_squarings
        counts, quantiles = window_summary(self.ns_stats, squarings)
        out = window_scalars(counts, quantiles, squarings)
        self.ns_stats["fast_exp_budget"] = next_squaring_budget(
            counts.tolist(), squarings, self.ns_stats.get("fast_exp_budget", squarings))
        out["fast_exp/squaring_budget"] = float(self.ns_stats["fast_exp_budget"])
        return out

    def named_manifold_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for g in self._groups("manifold") for n, p in zip(g["names"], g["params"])]

    def state_dict(self) -> dict:
        manifold = {}
        for n, p in self.named_manifold_params():
            keys = state_shapes(tuple(p.shape), self.cfg)
            entry = {k: self.state[p][k].detach().clone() for k in keys if k in self.state[p]}
            if entry:
                manifold[n] = entry
        euclid = {}
        for g in self._groups("euclidean"):
            for n, p in zip(g["names"], g["params"]):
                if p in self._euclid.state and self._euclid.state[p]:
                    euclid[n] = {k: (v.detach().clone() if torch.is_tensor(v) else v)
                                 for k, v in self._euclid.state[p].items()}
        masters = {n: self.state[p]["master"].detach().clone()
                   for n, p in self.named_manifold_params() if "master" in self.state[p]}
        return {"format": STATE_FORMAT, "step": self.step_count, "skipped_steps": self.skipped_steps,
                "manifold": manifold, "euclidean": euclid, "masters": masters}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()` (also the manifold-only dicts of `ShardedManifoldStep`: the Euclidean state then
        starts fresh)."""
        where = "ManifoldOptimizer.load_state_dict"
        manifold = check_state_format(state_dict, where)
        named = dict(self.named_manifold_params())
        shapes = {n: tuple(p.shape) for n, p in named.items()}
        check_manifold_state(manifold, shapes, self.cfg, where)
        euclid_named = {n: p for g in self._groups("euclidean") for n, p in zip(g["names"], g["params"])}
        euclid = state_dict.get("euclidean", {})
        unknown = sorted(set(euclid) - set(euclid_named))
        if unknown:
            raise ValueError(f"{where}: Euclidean optimizer state for unknown parameter(s) {unknown[:5]}; the "
                             "checkpoint was saved from a different model")
        masters = state_dict.get("masters", {})
        check_manifold_state({n: {} for n in masters}, shapes, self.cfg, where)
        for name, entry in manifold.items():
            p = named[name]
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            for key, value in entry.items():
                self.state[p][key] = value.detach().to(device=p.device, dtype=dtype).clone()
        for name, value in masters.items():
            self.state[named[name]]["master"] = value.detach().to(named[name].device, torch.float32).clone()
        for name, st in euclid.items():
            p = euclid_named[name]
            self._euclid.state[p] = {k: (v.detach().to(p.device).clone() if torch.is_tensor(v) and k != "step"
                                         else (v.clone() if torch.is_tensor(v) else v)) for k, v in st.items()}
        self.step_count = int(state_dict["step"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
