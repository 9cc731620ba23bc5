"""One training worker (one data-parallel rank), top to bottom.

  build the model inside deepspeed.zero.Init (a 2B model is never whole on one rank)
  -> DeepSpeed ZeRO-3 engine with the client optimizer (AdamW on Euclidean params) + ShardedManifoldStep
  -> resume (newest valid checkpoint of this run, else train.resume), exact data position
  -> per optimizer step: grad_accum x [data, forward, backward, retraction, engine.step]
  -> every log_every: scalars; every eval_every: clean/certified accuracy on the held-out stream;
     every ckpt.every_steps, at the end and on preemption: a checkpoint reported through `report`.
Ray is not imported here: `report(metrics, checkpoint_dir, name)` and `preempted()` are handed in by
`trainer.py`, so the loop is plain torch.distributed + DeepSpeed.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from lipnext_scale.config import JobConfig, config_to_dict
from lipnext_scale.train.checkpoint import (
    checkpoint_dir_name, find_latest_valid, load_manifold_state, load_train_state, write_rank_files,
)
from lipnext_scale.train.loss import certified_loss, training_eps
from lipnext_scale.train.metrics import PhaseTimer, deepspeed_config, lipschitz_from_orthogonality_error
from lipnext_scale.train.tb import ScalarLog
from lipnext_scale.train.zero_state import (
    cast_module_partitions, collect_local_state, param_shapes, restore_local_state, set_fp32_masters,
)

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any], "str | None", "str | None"], None]


class Objective(nn.Module):
    """model + certified-training loss in one forward, so DeepSpeed gathers the head rows the loss reads.
    `eps` (the ramped training radius, a float set by the loop each step) is an argument, not state."""

    def __init__(self, model: nn.Module, loss_cfg):
        super().__init__()
        self.model, self.loss_cfg = model, loss_cfg

    def forward(self, images: torch.Tensor, labels: torch.Tensor, eps: float):
        logits = self.model(images)
        return certified_loss(logits, labels, self.model.head.rows(), eps, self.loss_cfg), logits


class StopFlag:
    """Set by SIGTERM (preemption) when the loop runs in the main thread; Ray Train runs it in a thread,
    where the platform's preemption notice (`preempted()`) is used instead. Agreed on by all ranks."""

    def __init__(self, device: str):
        self.set, self.device = False, device
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_):
        self.set = True

    def any_rank(self) -> bool:
        flag = torch.tensor([float(self.set)], device=self.device)
        dist.all_reduce(flag)
        return bool(flag[0] > 0)


def _new_window(device: str) -> dict[str, Any]:
    """Running sums (loss * n, correct, n) kept on the device: no host sync per micro-batch."""
    return {"sums": torch.zeros(3, dtype=torch.float64, device=device), "t0": time.perf_counter()}


def train_worker(cfg: JobConfig, ds_base: dict, run_url: str, rank: int, world: int, *, report: Report,
                 preempted: Callable[[], bool] = lambda: False, device: str = "cpu") -> dict[str, Any]:
    import deepspeed

    from lipnext_scale.data.shards import make_train_loader
    from lipnext_scale.model import create_model
    from lipnext_scale.optim import ShardedManifoldStep, build_zero3_optimizers

    tc = cfg.train
    deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(tc.seed)  # identical initial weights on every rank (zero.Init also broadcasts)
    ds_cfg = deepspeed_config(ds_base, cfg, world)
    dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
    # Built and initialised in fp32 (QR has no bf16 kernel, and bf16-rounded matrices are not orthogonal),
    # partitioned as it is built; for bf16 the module copy is cast and the fp32 masters get the exact values.
    with deepspeed.zero.Init(config_dict_or_path={**ds_cfg, "bf16": {"enabled": False}}):
        model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
                             **cfg.model.overrides())
    exact_init = cast_module_partitions(model, dtype)
    objective = Objective(model, cfg.loss)
    deepspeed.zero.register_external_parameter(objective, model.head.direction)
    client_opt, _ = build_zero3_optimizers(model, cfg.optim)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=client_opt, config=ds_cfg)
    set_fp32_masters(model, exact_init)
    del exact_init
    manifold = ShardedManifoldStep(engine, model, cfg.optim)
    # The matrices an input passes through, with repeats (R twice per block): the monitoring bound's product.
    slot_shapes = {s.name: tuple(s.shape) for s in manifold.slots}
    lipschitz_shapes = [slot_shapes[name] for name in model.lipschitz_path()]

    # ---- resume: rank 0 picks the checkpoint, everyone loads it
    start_step, resumed_from, batches_done = 0, None, 0
    choice = [_pick_resume(tc.resume, run_url) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    resumed_from = choice[0]
    if resumed_from is not None:
        state = load_train_state(resumed_from, partition=(rank, world))
        restore_local_state(engine, model, state)
        # each rank reads the manifold state of the matrices it owns now, from their old owners' files only
        owned = load_manifold_state(resumed_from, [sl.name for sl in manifold.owned])
        manifold.load_state_dict({**state.manifold_extra, "format": manifold.scalars()["format"], "manifold": owned})
        start_step = state.step
        # Same world size: exactly where this rank stopped. Otherwise: the same number of samples seen.
        per_rank = state.data.get("batches_per_rank", start_step * tc.grad_accum)
        batches_done = per_rank if state.world_size == world else round(per_rank * state.world_size / world)
        engine.global_steps = start_step
        engine.micro_steps = start_step * tc.grad_accum
        engine.global_samples = start_step * tc.grad_accum * cfg.data.batch_size * world
        if rank == 0:
            log.warning("resumed from %s (step %d, written at world size %d, now %d)", resumed_from,
                        start_step, state.world_size, world)
        del state

    loader = make_train_loader(cfg.data.train_url, image_size=cfg.model.image_size, batch_size=cfg.data.batch_size,
                               dataset=cfg.data.dataset, rank=rank, world_size=world,
                               num_workers=cfg.data.loader_processes, seed=cfg.data.seed + tc.seed,
                               start_batch=batches_done, shuffle_buffer=cfg.data.shuffle_buffer,
                               deterministic=tc.deterministic_data)
    batches = iter(loader)
    tb = ScalarLog(f"{run_url.rstrip('/')}/tensorboard", enabled=rank == 0)
    # On a GPU the phases are timed with a synchronize at each boundary, else async kernels blur the split.
    timer = PhaseTimer(sync=torch.cuda.synchronize if device.startswith("cuda") else None)
    stop = StopFlag(device)
    window = _new_window(device)
    last: dict[str, Any] = {"resumed_from": resumed_from or "", "start_step": start_step}
    bar = _progress(rank, tc, start_step)

    def checkpoint(step: int, metrics: dict[str, Any]) -> None:
        with timer.phase("checkpoint"):
            _save(engine, model, manifold, cfg, rank, world, step, batches_done, metrics, report)
        tb.sync()

    if resumed_from is not None and not resumed_from.startswith(run_url.rstrip("/") + "/"):
        checkpoint(start_step, dict(last))  # this run's directory is self-contained from here on

    step = start_step
    while step < tc.steps:
        engine.train()
        for _ in range(tc.grad_accum):
            with timer.phase("data"):
                images, labels = next(batches)
                images, labels = images.to(device, dtype), labels.to(device)
                batches_done += 1
            with timer.phase("forward"):
                loss, logits = engine(images, labels, training_eps(step, tc.steps, cfg.loss))
            with timer.phase("backward"):
                engine.backward(loss)
            with timer.phase("retraction"):
                manifold.step()  # between backward and engine.step: it writes the fp32 masters
            with timer.phase("optimizer"):
                engine.step()
            window["sums"] += torch.stack([loss.detach().float() * labels.numel(),
                                           (logits.argmax(1) == labels).sum().float(),
                                           torch.tensor(float(labels.numel()), device=device)]).double()
        step += 1
        if bar is not None:
            bar.update(1)
        stopping = stop.any_rank() or (step % tc.log_every == 0 and preempted())
        if step % tc.log_every == 0 or step == tc.steps:
            last.update(_log_step(step, window, timer, manifold, lipschitz_shapes, cfg, tb, device))
        if step == tc.steps or (tc.eval_every and step % tc.eval_every == 0):
            last.update(_evaluate(engine, model, manifold, lipschitz_shapes, cfg, rank, world, device, dtype, tb, step))
        if step == tc.steps:
            checkpoint(step, {**last, "step": step, "final": True})
        elif step % cfg.ckpt.every_steps == 0 or stopping:
            checkpoint(step, {**last, "step": step, "preempted": stopping})
        elif step % tc.log_every == 0:
            report({**last, "step": step}, None, None)
        if stopping:
            log.warning("rank %d: stopping at step %d after a preemption notice; checkpoint written", rank, step)
            break
    tb.close()
    if bar is not None:
        bar.close()
    return {**last, "step": step}


def _pick_resume(resume: str, run_url: str) -> str | None:
    """The newest valid checkpoint of this run (a restart after a fault, or a re-submitted job), else
    the explicit `train.resume` path, else None (fresh start)."""
    latest = find_latest_valid(run_url)
    if latest is not None:
        return latest
    if resume not in ("auto", "none"):
        return resume.rstrip("/")
    return None


def _save(engine, model, manifold, cfg: JobConfig, rank: int, world: int, step: int, batches_done: int,
          metrics: dict[str, Any], report: Report) -> None:
    tensors, scalars, keys = collect_local_state(engine, model)
    extra = {"optim_scalars": scalars, "manifold": manifold.scalars(),
             "data": {"batches_per_rank": batches_done, "world_size": world, "seed": cfg.data.seed + cfg.train.seed,
                      "epoch": 0}}
    meta = None
    if rank == 0:
        meta = {"step": step, "world_size": world, "param_shapes": param_shapes(model), "optim_state_keys": keys,
                "manifold_owners": manifold.owner_map(),
                "config": config_to_dict(cfg), "time": time.time(), "versions": _versions()}
    with tempfile.TemporaryDirectory(prefix="lipnext-ckpt-") as local:
        write_rank_files(local, rank, tensors, extra, meta, manifold=manifold.state_tensors())  # owned matrices only
        report(metrics, local, checkpoint_dir_name(step))


def _log_step(step, window, timer, manifold, shapes, cfg: JobConfig, tb: ScalarLog, device: str) -> dict[str, float]:
    sums = window["sums"].clone()
    dist.all_reduce(sums)  # on the device: NCCL reduces only GPU tensors
    loss, correct, seen = sums.tolist()  # totals over all ranks
    elapsed = time.perf_counter() - window["t0"]
    times = timer.take()
    orth = manifold.max_orthogonality_error()  # a collective
    out = {
        "train/loss": loss / max(seen, 1), "train/acc": correct / max(seen, 1),
        "train/lr": manifold.stats.get("lr", cfg.optim.lr), "train/images_per_s": seen / max(elapsed, 1e-9),
        "train/eps": training_eps(step - 1, cfg.train.steps, cfg.loss),
        "train/max_orthogonality_error": orth,
        "train/lipschitz_bound": lipschitz_from_orthogonality_error(orth, shapes),
        **{f"time/{k}": v for k, v in times.items()},
    }
    tb.scalars(out, step)
    window.update(_new_window(device))
    return out


@torch.no_grad()
def _evaluate(engine, model, manifold, shapes, cfg: JobConfig, rank: int, world: int, device: str, dtype,
              tb: ScalarLog, step: int) -> dict[str, float]:
    """Clean and certified accuracy on up to eval_batches held-out batches per rank: a training-time
    estimate (radii divided by the bound from the fp32 masters' orthogonality error; with bf16 the logits
    themselves are bf16), never a certificate: `lipnext certify` on the exported weights gives that.
    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank out of
    data feeds a dummy batch."""
    import deepspeed

    from lipnext_scale.certify.certify import (
        certified_mask, certified_radius, format_eps, model_pair_distances, parse_eps_list,
    )
    from lipnext_scale.data.shards import make_eval_loader

    if not cfg.data.eval_url:
        return {}
    eps = parse_eps_list(cfg.certify.eps)
    lipschitz = lipschitz_from_orthogonality_error(manifold.max_orthogonality_error(), shapes)
    with deepspeed.zero.GatheredParameters([model.head.direction]):
        pair = model_pair_distances(model)
    engine.eval()
    it = iter(make_eval_loader(cfg.data.eval_url, image_size=cfg.model.image_size, batch_size=cfg.data.batch_size,
                               dataset=cfg.data.dataset, rank=rank, world_size=world, num_workers=0))
    counts = torch.zeros(2 + len(eps), dtype=torch.float64, device=device)  # seen, correct, certified per eps
    s = cfg.model.image_size
    for _ in range(cfg.train.eval_batches):
        batch = next(it, None)
        have = torch.tensor([float(batch is not None)], device=device)
        dist.all_reduce(have)
        if have[0] == 0:
            break
        images, labels = (batch[0], batch[1]) if batch is not None else (torch.zeros(1, 3, s, s), torch.zeros(1, dtype=torch.long))
        _, logits = engine(images.to(device, dtype), labels.to(device), cfg.loss.eps)
        if batch is None:
            continue
        pred, _, radius = certified_radius(logits.float().cpu(), pair, lipschitz)
        counts[0] += labels.numel()
        counts[1] += float((pred == labels).sum())
        counts[2:] += certified_mask(pred, radius, labels, eps).double().sum(0).to(device)
    dist.all_reduce(counts)
    engine.train()
    n = max(float(counts[0]), 1.0)
    out = {"eval/clean_acc": float(counts[1]) / n, "eval/samples": float(counts[0]), "eval/lipschitz_bound": lipschitz}
    for i, e in enumerate(eps):
        out[f"eval/cra_{format_eps(e).replace('/', '_')}"] = float(counts[2 + i]) / n
    tb.scalars(out, step)
    return out


def _progress(rank: int, tc, start_step: int):
    if rank != 0 or not tc.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(total=tc.steps, initial=start_step, desc=f"train {tc.name}", mininterval=5.0)


def _versions() -> dict[str, str]:
    import deepspeed

    import lipnext_scale

    return {"lipnext_scale": getattr(lipnext_scale, "__version__", "unknown"), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__}
