"""The Euclidean parameters' optimizer: AdamW or NAdam (LiResNet++ uses NAdam + Lookahead), optionally
with plain Lookahead (Zhang et al. 2019, alpha = 1/2): every k steps slow <- slow + (fast - slow) / 2,
fast <- slow; also at the end of a step after `request_lookahead_sync()` (before evaluations and checkpoints).

The same classes serve one process (real parameters) and DeepSpeed ZeRO-3 (the flat fp32 partitions
DeepSpeed hands its client optimizer). Param groups flagged `manifold` are left alone (no update, no
state): the manifold step owns them. The Lookahead copy lives in the optimizer state under
`lookahead_slow`, so ZeRO-3 checkpoints save and re-partition it like Adam's moments.
"""

from __future__ import annotations

import torch

LOOKAHEAD_ALPHA = 0.5


class _EuclideanOnly:
    lookahead_k = 0
    sync_next = False  # set by `request_lookahead_sync`: the next step ends with the Lookahead update

    def request_lookahead_sync(self) -> None:
        """Synchronise slow and fast weights at the end of the next step (before an evaluation or checkpoint,
        as timm's `sync_lookahead`, which LiResNet++ calls at every epoch end)."""
        self.sync_next = self.lookahead_k > 0

    @torch.no_grad()
    def step(self, closure=None):
        hidden = [(g, g["params"]) for g in self.param_groups if g.get("manifold")]
        for g, _ in hidden:
            g["params"] = []
        try:
            fresh = {p: p.detach().clone() for g in self.param_groups for p in g["params"]
                     if self.lookahead_k > 0 and "lookahead_slow" not in self.state.get(p, {})}
            loss = super().step(closure)
            if self.lookahead_k > 0:
                self._lookahead(fresh, self.sync_next)
            self.sync_next = False
            return loss
        finally:
            for g, params in hidden:
                g["params"] = params

    def _lookahead(self, fresh: dict, sync: bool) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p in self.state and "step" in self.state[p]]
            if not params:
                continue
            for p in params:
                if p in fresh:  # the slow copy starts at the weights before the first step
                    self.state[p]["lookahead_slow"] = fresh[p]
            if not sync and int(float(self.state[params[0]]["step"])) % self.lookahead_k:  # a CPU read per group
                continue
            for p in params:
                slow = self.state[p]["lookahead_slow"]
                slow.add_(p.detach() - slow, alpha=LOOKAHEAD_ALPHA)
                p.copy_(slow)


class EuclideanAdamW(_EuclideanOnly, torch.optim.AdamW):
    pass


class EuclideanNAdam(_EuclideanOnly, torch.optim.NAdam):
    pass


def build_euclidean_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """AdamW or NAdam (`optim.euclid_optimizer`) over `groups`, with Lookahead if `optim.euclid_lookahead_k`."""
    if cfg.euclid_optimizer == "nadam":
        opt = EuclideanNAdam(groups, lr=cfg.euclid_lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             decoupled_weight_decay=True)
    else:
        opt = EuclideanAdamW(groups, lr=cfg.euclid_lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt.lookahead_k = cfg.euclid_lookahead_k
    return opt
