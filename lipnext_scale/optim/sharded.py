"""The manifold step under DeepSpeed ZeRO-3: each matrix updated once per step, by its owner rank.

Usage (every rank):
    client_opt, manifold_names = build_zero3_optimizers(model, cfg.optim)    # before deepspeed.initialize
    engine, *_ = deepspeed.initialize(model=model, optimizer=client_opt, config=ds_config)
    manifold = ShardedManifoldStep(engine, model, cfg.optim)
    loop: loss = ...; engine.backward(loss); manifold.step(); engine.step()

Why this shape: ZeRO-3 keeps the fp32 master of a parameter as contiguous slices of its flattened value,
one slice per rank (`param.ds_tensor`, padded to equal size). Writing through
`deepspeed.zero.GatheredParameters` changes only the bf16 module copy and the fp32 master undoes it at
the next step, so the step works on the fp32 partitions themselves (`safe_get_local_fp32_param`,
`safe_get_local_grad`, `safe_set_local_fp32_param`); the next `engine.step()` copies them into the bf16
module partitions. Between `engine.backward` and `engine.step` one `step()`:
  1. one all-reduce: global manifold grad norm (for `optim.grad_clip`) and a NaN/Inf count (skip + count);
  then per round (each owner's next bucket of owned matrices, <= optim.manifold_bucket_mb):
  2. one all_to_all: every rank sends each owner its slices of (master, grad) for the owner's matrices;
  3. each owner runs `manifold_update` on them (same-shape matrices stacked): once per matrix per step;
  4. one all_to_all back: each rank receives its slice of every new matrix and writes its fp32 partition.
  The collectives are asynchronous and double-buffered: round j+1's gather and round j-1's scatter are in
  flight while the owners compute round j.
  Finally the manifold grads are zeroed so DeepSpeed's `gradient_clipping` norm covers the Euclidean group
  only; the client optimizer skips the manifold groups, so DeepSpeed holds no Adam state for them.
State: only the owner holds a matrix's moments and Lookahead slow copy (`optim.update.state_shapes`);
`state_dict()` is this rank's part, never gathered. Checkpoints (`lipnext_scale.ckpt`) write it per rank,
keyed by parameter name; at any world size each rank loads the entries of the matrices it owns now.
The slice arithmetic is ZeRO-3's (`optim/partition.py`, shared with the checkpoint code).
Owners: greedy by update cost n p^2, deterministic from names, shapes and world size.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from lipnext_scale.optim.euclidean import build_euclidean_optimizer
from lipnext_scale.optim.fast_exp import next_squaring_budget, window_scalars, window_summary
from lipnext_scale.optim.manifold import check_manifold_parameter, orthogonality_error
from lipnext_scale.optim.optimizer import (
    STATE_FORMAT, check_manifold_state, check_state_format, clip_coefficient, split_parameters,
)
from lipnext_scale.optim.partition import join_partitions, partition_of, partition_range, partition_size
from lipnext_scale.optim.retraction import orthogonalize_exact
from lipnext_scale.optim.schedule import lr_multiplier
from lipnext_scale.optim.update import StepAt, manifold_update

log = logging.getLogger(__name__)


def retraction_cost(shape: tuple[int, int]) -> int:
    n, p = max(shape), min(shape)
    return n * p * p


def assign_owners(shapes: dict[str, tuple[int, int]], world_size: int) -> dict[str, int]:
    """name -> owner rank, balancing the sum of n p^2 per rank (largest first, ties by name)."""
    load = [0] * world_size
    owners = {}
    for name in sorted(shapes, key=lambda n: (-retraction_cost(shapes[n]), n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += retraction_cost(shapes[name])
    return owners


def plan_rounds(slots: list, world_size: int, bucket_numel: int) -> list[list]:
    """Split the step into rounds: in round j each owner handles its j-th bucket of owned matrices (packed in
    order up to `bucket_numel` elements, at least one matrix). Deterministic, so all ranks agree."""
    buckets: list[list[list]] = [[] for _ in range(world_size)]
    for s in slots:
        mine = buckets[s.owner]
        if not mine or sum(o.numel for o in mine[-1]) + s.numel > bucket_numel:
            mine.append([])
        mine[-1].append(s)
    rounds = max((len(b) for b in buckets), default=0)
    return [[s for b in buckets if j < len(b) for s in b[j]] for j in range(rounds)]


def build_zero3_optimizers(model: nn.Module, cfg) -> tuple[torch.optim.Optimizer, list[str]]:
    """(client optimizer for `deepspeed.initialize(optimizer=...)`, manifold parameter names).

    Call before `deepspeed.initialize` (it validates the manifold matrices while they are still whole).
    Group 0: Euclidean params, NAdam or AdamW (euclid_lr, betas, weight_decay, optional Lookahead). Group 1
    (if any): manifold params, flagged `manifold: True`, lr 0; the client optimizer never touches it.
    """
    cfg.validate()
    manifold, euclid = split_parameters(model)
    for name, p in manifold:
        check_manifold_parameter(name, tuple(getattr(p, "ds_shape", p.shape)),
                                 None if hasattr(p, "ds_shape") else p.detach())
    groups = []
    if euclid:
        groups.append({"params": [p for _, p in euclid], "lr": cfg.euclid_lr, "weight_decay": cfg.weight_decay})
    if manifold:
        groups.append({"params": [p for _, p in manifold], "lr": 0.0, "weight_decay": 0.0, "manifold": True})
    if not groups:
        raise ValueError("build_zero3_optimizers: the model has no trainable parameters")
    opt = build_euclidean_optimizer(groups, cfg)
    return opt, [n for n, _ in manifold]


class _Slot:
    """Where one manifold matrix lives: its shape, flat size, per-rank partition size and owner."""

    def __init__(self, name: str, param: nn.Parameter, owner: int, rank: int, world: int):
        self.name, self.param, self.owner = name, param, owner
        self.shape = tuple(param.ds_shape)
        self.numel = int(param.ds_numel)
        self.part = partition_size(self.numel, world)  # equal on every rank; the last one is padded
        if int(param.ds_tensor.numel()) != self.part:
            raise RuntimeError(f"{name}: ZeRO-3 partition of {param.ds_tensor.numel()} elements, expected "
                               f"ceil({self.numel} / {world}) = {self.part}; unsupported DeepSpeed partitioning")
        lo, hi = partition_range(self.numel, rank, world)
        self.valid = hi - lo  # this rank's real (unpadded) elements

    def full(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return join_partitions(parts, self.shape)

    def slices(self, value: torch.Tensor, world: int) -> list[torch.Tensor]:
        """Rank r's slice of the flattened value, for every r (views; only a padded last slice is copied)."""
        return [partition_of(value, r, world) for r in range(world)]


class _InFlight:
    """An asynchronous all_to_all of flat fp32 buffers: `wait()` gives one buffer per source rank."""

    def __init__(self, work, recv: torch.Tensor, recv_sizes: list[int]):
        self.work, self.recv, self.recv_sizes = work, recv, recv_sizes

    def wait(self) -> list[torch.Tensor]:
        self.work.wait()
        return list(torch.split(self.recv, self.recv_sizes))


class ShardedManifoldStep:
    def __init__(self, engine, model: nn.Module, cfg, schedule_euclidean: bool = True):
        import torch.distributed as dist

        cfg.validate()
        self.engine, self.cfg, self.dist = engine, cfg, dist
        self.schedule_euclidean = schedule_euclidean
        manifold, _ = split_parameters(model)
        missing = [n for n, p in manifold if not hasattr(p, "ds_tensor")]
        if missing:
            raise RuntimeError(f"ShardedManifoldStep: {missing[:3]} are not ZeRO-3 partitioned; build it after "
                               "deepspeed.initialize with zero_optimization.stage = 3")
        self.group = manifold[0][1].ds_process_group if manifold else None
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        for name, p in manifold:
            check_manifold_parameter(name, tuple(p.ds_shape))
        owners = assign_owners({n: tuple(p.ds_shape) for n, p in manifold}, self.world)
        self.slots = [_Slot(n, p, owners[n], self.rank, self.world) for n, p in manifold]
        self.owned = [s for s in self.slots if s.owner == self.rank]
        # collectives run on the partitions' device (cuda under NCCL, cpu under gloo)
        self.device = manifold[0][1].ds_tensor.device if manifold else torch.device("cpu")
        self.rounds = plan_rounds(self.slots, self.world, int(cfg.manifold_bucket_mb * 2 ** 20 / 4))
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # owned matrices only: moments, slow copy
        self.step_count = 0
        self.skipped_steps = 0
        self.retraction_counts = {s.name: 0 for s in self.owned}  # cumulative, this rank's matrices
        self.ns_stats: dict = {}
        self.stats: dict = {}
        self._sync_next = False
        self._check_initial_orthogonality()

    def owner_map(self) -> dict[str, int]:
        """name -> owner rank (identical on every rank)."""
        return {s.name: s.owner for s in self.slots}

    # ------------------------------------------------------------------ collectives

    def _start_exchange(self, sends: list[torch.Tensor], recv_sizes: list[int]) -> _InFlight:
        """Start an all_to_all of one flat fp32 buffer per destination rank."""
        send = torch.cat(sends)
        recv = torch.empty(sum(recv_sizes), dtype=torch.float32, device=self.device)
        work = self.dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes,
                                           input_split_sizes=[t.numel() for t in sends], group=self.group,
                                           async_op=True)
        return _InFlight(work, recv, recv_sizes)

    def _start_gather(self, slots: list[_Slot], with_grads: bool, grad_scale=1.0) -> _InFlight:
        """Send each owner this rank's slices of (master[, grad]) of its matrices in `slots` (one round)."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

        per = 2 if with_grads else 1
        sends = []
        for dest in range(self.world):
            pieces = []
            for s in slots:
                if s.owner == dest:
                    pieces.append(safe_get_local_fp32_param(s.param).reshape(-1).float())
                    if with_grads:
                        grad = safe_get_local_grad(s.param).reshape(-1).float()
                        pieces.append(grad * grad_scale if with_grads and grad_scale is not None else grad)
            sends.append(torch.cat(pieces) if pieces else torch.empty(0, device=self.device))
        mine = [s for s in slots if s.owner == self.rank]
        return self._start_exchange(sends, [per * sum(s.part for s in mine)] * self.world)

    def _finish_gather(self, slots: list[_Slot], pending: _InFlight, with_grads: bool):
        """The owned matrices of one round, whole: ({name: master}, {name: grad})."""
        recvs = pending.wait()
        per = 2 if with_grads else 1
        masters, grads, offset = {}, {}, 0
        for s in slots:
            if s.owner != self.rank:
                continue
            masters[s.name] = s.full([r.narrow(0, offset, s.part) for r in recvs])
            if with_grads:
                grads[s.name] = s.full([r.narrow(0, offset + s.part, s.part) for r in recvs])
            offset += per * s.part
        return masters, grads

    def _gather_to_owners(self, slots: list[_Slot], with_grads: bool, grad_scale=1.0):
        return self._finish_gather(slots, self._start_gather(slots, with_grads, grad_scale), with_grads)

    def _start_scatter(self, slots: list[_Slot], new: dict[str, torch.Tensor]) -> _InFlight:
        mine = [s for s in slots if s.owner == self.rank]
        rows = {s.name: s.slices(new[s.name], self.world) for s in mine}
        sends = [torch.cat([rows[s.name][dest] for s in mine]) if mine else torch.empty(0, device=self.device)
                 for dest in range(self.world)]
        sizes = [sum(s.part for s in slots if s.owner == src) for src in range(self.world)]
        return self._start_exchange(sends, sizes)

    def _finish_scatter(self, slots: list[_Slot], pending: _InFlight) -> None:
        """Every rank writes its slice of each new matrix of `slots` (one round) into its fp32 partition."""
        from deepspeed.utils import safe_set_local_fp32_param

        recvs = pending.wait()
        offsets = [0] * self.world
        for s in slots:
            safe_set_local_fp32_param(s.param, recvs[s.owner].narrow(0, offsets[s.owner], s.part))  # copies
            offsets[s.owner] += s.part

    def _scatter_from_owners(self, slots: list[_Slot], new: dict[str, torch.Tensor]) -> None:
        self._finish_scatter(slots, self._start_scatter(slots, new))

    def _grad_norm_and_nonfinite(self) -> tuple[torch.Tensor, int]:
        """(global manifold grad norm as a device scalar, number of matrices with a NaN/Inf grad entry):
        one all-reduce and one host read per step."""
        from deepspeed.utils import safe_get_local_grad

        norms = torch.stack([torch.linalg.vector_norm(safe_get_local_grad(s.param).reshape(-1)[: s.valid],
                                                      dtype=torch.float64) for s in self.slots])
        finite = torch.isfinite(norms)  # a norm is finite iff every entry is (fp32 squares cannot overflow fp64)
        local = torch.stack([torch.where(finite, norms, 0.0).pow(2).sum(), (~finite).sum().double()])
        self.dist.all_reduce(local, group=self.group)
        return local[0].sqrt(), int(local[1])

    # ------------------------------------------------------------------ the step

    def _update_owned(self, masters: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                      lr: float) -> dict[str, torch.Tensor]:
        """Owner compute of one round: same-shape matrices stacked into one `manifold_update` call."""
        by_shape: dict[tuple, list[str]] = {}
        for name, x in masters.items():
            by_shape.setdefault(tuple(x.shape), []).append(name)
        new = {}
        for names in by_shape.values():
            states = [self.state.setdefault(n, {}) for n in names]
            keys = set.intersection(*(set(s) for s in states))
            stacked = {k: torch.stack([s[k] for s in states]) for k in keys}
            out = manifold_update(torch.stack([masters[n] for n in names]), torch.stack([grads[n] for n in names]),
                                  stacked, StepAt(self.step_count, lr, self._sync_next), cfg=self.cfg,
                                  stats=self.ns_stats)
            for i, n in enumerate(names):
                self.state[n] = {k: v[i].clone() for k, v in stacked.items()}
                new[n] = out[i]
        return new

    @torch.no_grad()
    def step(self) -> bool:
        """The manifold update of this optimizer step; returns False when it was skipped (NaN/Inf grads)."""
        if not self.engine.is_gradient_accumulation_boundary():
            return False  # grads are reduced into the fp32 partitions only at the boundary
        t0 = time.perf_counter()
        norm, nonfinite = self._grad_norm_and_nonfinite()
        if nonfinite:
            # Grads are left as they are: DeepSpeed's norm check then sees them too.
            self.skipped_steps += 1
            if self.rank == 0:
                log.warning("ShardedManifoldStep: skipped step %d (skipped so far: %d): NaN/Inf in the gradient "
                            "of %d manifold matrices", self.step_count, self.skipped_steps, nonfinite)
            self.stats = {"skipped": True, "retractions": {}, "seconds": time.perf_counter() - t0}
            return False
        mult = lr_multiplier(self.step_count, self.cfg)
        scale = clip_coefficient(norm, self.cfg.grad_clip)
        scale = scale.float() if torch.is_tensor(scale) else None
        lr = self.cfg.lr * mult
        counts, compute = {}, 0.0
        gather = self._start_gather(self.rounds[0], True, scale) if self.rounds else None
        scatter_prev = None
        for j, slots in enumerate(self.rounds):  # bounded memory: <= 2 rounds in flight
            masters, grads = self._finish_gather(slots, gather, True)
            if j + 1 < len(self.rounds):
                gather = self._start_gather(self.rounds[j + 1], True, scale)
            t1 = time.perf_counter()
            new = self._update_owned(masters, grads, lr)
            for name in new:
                counts[name] = counts.get(name, 0) + 1
                self.retraction_counts[name] += 1
            compute += time.perf_counter() - t1
            del masters, grads
            scatter = (slots, self._start_scatter(slots, new))
            if scatter_prev is not None:
                self._finish_scatter(*scatter_prev)
            scatter_prev = scatter
        if scatter_prev is not None:
            self._finish_scatter(*scatter_prev)
        self._zero_manifold_grads()
        self._sync_next = False
        if self.schedule_euclidean:
            for g in self.engine.optimizer.param_groups:
                if not g.get("manifold"):
                    g["lr"] = self.cfg.euclid_lr * mult
        self.step_count += 1
        seconds = time.perf_counter() - t0
        self.stats = {"skipped": False, "retractions": counts, "grad_norm": norm, "lr": lr,
                      "seconds": seconds, "compute_seconds": compute, "comm_seconds": seconds - compute,
                      "rounds": len(self.rounds), "ns_fallbacks": self.ns_stats.get("ns_fallbacks", 0)}
        return True

    def _zero_manifold_grads(self) -> None:
        from deepspeed.utils import safe_set_local_grad

        for s in self.slots:
            safe_set_local_grad(s.param, torch.zeros(s.part, dtype=torch.float32, device=self.device))

    # ------------------------------------------------------------------ checks and state

    def request_lookahead_sync(self) -> None:
        """The next optimizer step ends with the Lookahead update of the manifold matrices and of the Euclidean
        parameters (DeepSpeed's client optimizer): slow and fast weights synchronised inside the step, where the
        fp32 masters are written (a write outside it would not reach the module's bf16 copy). Every rank."""
        self._sync_next = self.cfg.lookahead_k > 0
        client = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        if hasattr(client, "request_lookahead_sync"):
            client.request_lookahead_sync()

    def fast_exp_scalars(self) -> dict[str, float]:
        """This log window's FastExp branch shares (over all owners) and ||A||_F / rho quantiles (the largest
        owner's): two collectives and host reads, so call it on log steps, on every rank."""
        if self.cfg.retraction != "fast_exp":
            return {}
        squarings = self.cfg.fast_exp_squarings
        counts, quantiles = window_summary(self.ns_stats, squarings, self.device)
        counts, quantiles = counts.to(self.device), quantiles.to(self.device)
        self.dist.all_reduce(counts, group=self.group)
        self.dist.all_reduce(quantiles, op=self.dist.ReduceOp.MAX, group=self.group)
        out = window_scalars(counts, quantiles, squarings)  # the same counts on every rank: one budget
        self.ns_stats["fast_exp_budget"] = next_squaring_budget(
            counts.tolist(), squarings, self.ns_stats.get("fast_exp_budget", squarings))
        out["fast_exp/squaring_budget"] = float(self.ns_stats["fast_exp_budget"])
        return out

    def max_orthogonality_error(self) -> float:
        """max over all matrices of max|X^T X - I| of the fp32 masters (a collective, with host reads: call it
        every N steps, not every step)."""
        worst = 0.0
        for slots in self.rounds:
            masters, _ = self._gather_to_owners(slots, False)
            worst = max([worst] + [orthogonality_error(x) for x in masters.values()])
        local = torch.tensor([worst], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(local, op=self.dist.ReduceOp.MAX, group=self.group)
        return float(local[0])

    def _check_initial_orthogonality(self) -> None:
        """Reject non-orthogonal starting matrices (at the module dtype's rounding level). With a bf16 module
        DeepSpeed builds the fp32 masters from bf16-rounded weights (error ~1e-3): project those exactly
        onto the manifold once, so fp32 training starts on it."""
        bad, low_precision = [], any(s.param.ds_tensor.dtype not in (torch.float32, torch.float64) for s in self.slots)
        for slots in self.rounds:
            masters, _ = self._gather_to_owners(slots, False)
            for name, x in masters.items():
                slot = next(s for s in slots if s.name == name)
                try:
                    check_manifold_parameter(name, slot.shape, x.to(slot.param.ds_tensor.dtype))
                except ValueError as e:
                    bad.append(str(e))
            if low_precision:  # harmless if some are bad: the error below stops everything
                self._scatter_from_owners(slots, {n: orthogonalize_exact(x) for n, x in masters.items()})
        flag = torch.tensor([len(bad)], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(flag, group=self.group)
        if int(flag[0]):
            raise ValueError("ShardedManifoldStep: " + ("; ".join(bad) if bad else
                             f"{int(flag[0])} manifold matrices owned by other ranks are not (semi-)orthogonal "
                             "(their ranks' errors name them)"))

    def state_dict(self) -> dict:
        """This rank's manifold state: the entries of the matrices it owns, keyed by parameter name (no
        collective, nothing gathered). The union over ranks loads at any world size and into ManifoldOptimizer.
        Like `torch.optim.Optimizer.state_dict`, the tensors are references, not copies (a checkpoint of a
        large model must not double its optimizer memory): copy them before the next `step()` to keep them."""
        return {**self.scalars(),
                "manifold": {n: {k: v.detach() for k, v in e.items()} for n, e in self.state.items() if e}}

    def scalars(self) -> dict:
        return {"format": STATE_FORMAT, "step": self.step_count, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        """Load a `state_dict()` of any rank set / world size, or of `ManifoldOptimizer`: each rank keeps the
        entries of the matrices it owns now (it may be given only those). Call on every rank."""
        where = "ShardedManifoldStep.load_state_dict"
        manifold = check_state_format(state, where)
        check_manifold_state(manifold, {s.name: s.shape for s in self.slots}, self.cfg, where)
        self.state = {s.name: {k: v.detach().to(self.device, torch.float32).clone()
                               for k, v in manifold[s.name].items()}
                      for s in self.owned if s.name in manifold}
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
