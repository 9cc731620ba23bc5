"""One training worker (one data-parallel rank): build, resume, then a short loop.

Per optimizer step: accumulation x [data, forward, backward, retraction, engine.step] (the `BatchPlan` of this
world size, planned once per (re)start and carried by the Position), and nothing else: no
host read and no collective of the loop's own. On log steps (and checkpoint steps) one all-reduce agrees
on the loss window and on stopping (SIGTERM / the platform's preemption notice), and a non-finite loss
stops the run before any checkpoint of its weights is written; log steps also write scalars, eval steps
evaluate, checkpoint steps (ckpt.every_steps, the end, a stop) save through the CheckpointManager.
Ray is not imported here: `report(metrics, checkpoint_dir, name)` and `preempted()` are handed in by
`trainer.py`, so the loop is plain torch.distributed + DeepSpeed.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from dataclasses import replace
from typing import Any, Callable

from lipnext_scale.certify.during_training import retention
from lipnext_scale.ckpt import CheckpointManager, NonFiniteState
from lipnext_scale.ckpt.manager import Report
from lipnext_scale.config import DataConfig, JobConfig, config_to_dict
from lipnext_scale.model.lipschitz import lipschitz_from_orthogonality_error
from lipnext_scale.train.engine import (Built, WorkerRuntime, build_engine, deepspeed_config, gather_node_of_rank,
                                        hpz_partition_size, init_distributed)
from lipnext_scale.train.evaluate import evaluate
from lipnext_scale.train.loss import training_eps
from lipnext_scale.train.metrics import PhaseTimer, Window
from lipnext_scale.train.resume import Position, plan_for_world, restart_scalars, resume
from lipnext_scale.train.tb import ScalarLog

log = logging.getLogger(__name__)


class StopRequest:
    """This rank's wish to checkpoint now, and whether the run then stops (`ends_run`).

    In a process's main thread (torchrun, a plain launch) it is SIGTERM: the process is about to end, so
    checkpoint and stop. Ray Train runs the loop in a thread; there it is the platform's preemption notice
    (`preempted()`, asked on log steps): checkpoint once per notice and keep training, as Ray Train advises.
    For Ray a train function that returns has finished the run, so stopping would end it early; when the
    node goes, Ray Train restarts the workers (elastic: at the size left) and they resume from that checkpoint.
    """

    def __init__(self, preempted: Callable[[], bool]):
        self.signalled, self.preempted, self.noticed = False, preempted, False
        self.ends_run = threading.current_thread() is threading.main_thread()
        if self.ends_run:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_):
        self.signalled = True

    def __call__(self) -> bool:
        notice = bool(self.preempted())
        new_notice, self.noticed = notice and not self.noticed, notice
        return self.signalled or new_notice


def train_worker(cfg: JobConfig, ds_base: dict, run_url: str, runtime: WorkerRuntime, *, report: Report,
                 start: str | None = None) -> dict[str, Any]:
    """Train this rank (`runtime`) from `start` (the job's start checkpoint, chosen at job start; None: this
    run's newest valid checkpoint, if any) to `train.steps`; returns the last metrics. The ZeRO++
    hierarchical partition (configs/deepspeed/zero3_bf16_multinode.json) is sized from every rank's
    `runtime.node`; the choice is logged at every (re)start."""
    from lipnext_scale.data.shards import LoaderRuntime, make_train_loader

    rank, world, device = runtime.rank, runtime.world, runtime.device
    plan = plan_for_world(cfg, world, rank)  # the config's global batch split over this world size (logged)
    tc = cfg.train
    init_distributed(device)
    node_of_rank = gather_node_of_rank(runtime.node, world)
    if rank == 0 and "zero_hpz_partition_size" in ds_base.get("zero_optimization", {}):
        choice = hpz_partition_size(ds_base["zero_optimization"]["zero_hpz_partition_size"], node_of_rank,
                                    tc.deepspeed)
        log.warning("world size %d: %s", world, choice.reason)
    ds_config = deepspeed_config(ds_base, tc, plan, cfg.optim, world, node_of_rank)
    built = build_engine(cfg.model, cfg.optim, cfg.loss, ds_config, seed=tc.seed)
    manager = CheckpointManager(run_url, retention=retention(cfg), rank=rank, world=world, report=report,
                                device=device)
    position = resume(manager, built, start, plan)
    # the loader's batches are this size's micro-batches; data.batch_size (their bound) stays what the user wrote
    data = replace(cfg.data, seed=cfg.data.seed + tc.seed, batch_size=plan.micro)
    loader = make_train_loader(cfg.data.train_url, data,
                               image_size=cfg.model.image_size, num_classes=cfg.model.num_classes,
                               runtime=LoaderRuntime(rank=rank, world_size=world, start_batch=position.batches_done,
                                                     deterministic=tc.deterministic_data, uint8=True,
                                                     pin_memory=device.startswith("cuda")))
    return train(cfg, built, manager, position, iter(loader), report=report, runtime=runtime)


def train(cfg: JobConfig, built: Built, manager: CheckpointManager, position: Position, batches, *,
          report: Report, runtime: WorkerRuntime) -> dict[str, Any]:
    tc, rank, world, device = cfg.train, manager.rank, manager.world, runtime.device
    plan = position.plan
    eval_data = replace(cfg.data, batch_size=plan.micro)  # held-out batches as large as the training micro-batches
    stop = StopRequest(runtime.preempted)
    tb = ScalarLog(manager.layout.tensorboard(), enabled=rank == 0)
    timer, window = PhaseTimer(device), Window(device)
    step, batches_done, skipped = position.step, position.batches_done, built.manifold.skipped_steps
    last: dict[str, Any] = {"resumed_from": position.resumed_from or "", "start_step": step}
    bar = _progress(rank, tc, step)
    tb.scalars(restart_scalars(position, world), step)  # each (re)start, its world size and batching

    def save(metrics: dict[str, Any]) -> None:
        data = {"batches_per_rank": batches_done, "world_size": world, "seed": cfg.data.seed + tc.seed, "epoch": 0,
                "batch_plan": plan._asdict()}  # how its steps were batched (the stored config is the job's)
        with timer.phase("checkpoint"):
            manager.save(step, built.engine, built.model, built.manifold, data=data, config=config_to_dict(cfg),
                         metrics=metrics)
        tb.sync()

    if position.resumed_from and not manager.in_run(position.resumed_from):
        save(dict(last))  # this run's directory is self-contained from here on
    built.engine.train()
    while step < tc.steps:
        if _sync_before(step + 1, tc, cfg.ckpt.every_steps):
            built.manifold.request_lookahead_sync()  # the step before an evaluation or a scheduled checkpoint
        _train_step(built, batches, window, timer, training_eps(step, tc.steps, cfg.loss), plan.accumulation, device)
        batches_done += plan.accumulation
        step += 1
        if bar is not None:
            bar.update(1)
        log_step = step % tc.log_every == 0 or step == tc.steps
        ckpt_step = step % cfg.ckpt.every_steps == 0 or step == tc.steps
        eval_step = step == tc.steps or (tc.eval_every > 0 and step % tc.eval_every == 0)
        if not (log_step or ckpt_step or eval_step):
            continue  # the common case: no host sync, no collective of the loop's own
        agreed = window.agree(stop())
        diverged = _divergence(agreed, built.manifold.skipped_steps - skipped, step)
        if not diverged:
            if log_step:
                last.update(_log_step(step, agreed, window, timer, built, cfg, tb))
            if eval_step:
                last.update(_evaluate(step, built, cfg, eval_data, runtime, tb))
            try:
                if ckpt_step or agreed.stop:
                    save({**last, "step": step, **({"final": True} if step == tc.steps else
                                                   {"preempted": agreed.stop})})
                elif log_step:
                    report({**last, "step": step}, None, None)
            except NonFiniteState as e:
                diverged = str(e)
        if diverged:
            last["diverged"] = _diverged_message(diverged, manager)
            log.error("rank %d: %s", rank, last["diverged"])
            report({**last, "step": step}, None, None)
            break
        if agreed.stop and stop.ends_run:
            log.warning("rank %d: stopping at step %d after SIGTERM; checkpoint written", rank, step)
            break
        if agreed.stop:
            log.warning("rank %d: preemption notice: checkpoint written at step %d; training goes on until Ray "
                        "Train restarts the workers without the node", rank, step)
    tb.close()
    if bar is not None:
        bar.close()
    return {**last, "step": step}


def _train_step(built: Built, batches, window: Window, timer: PhaseTimer, eps: float, accumulation: int,
                device: str) -> None:
    """One optimizer step: only kernel launches and the optimizers' own collectives, no host read here."""
    engine = built.engine
    for _ in range(accumulation):
        with timer.phase("data"):
            images, labels = next(batches)  # uint8, pinned on a GPU host: the copy overlaps compute
            images = images.to(device, non_blocking=True).float().div_(255.0).to(built.dtype)
            labels = labels.to(device, non_blocking=True)
        with timer.phase("forward"):
            loss, logits = engine(images, labels, eps)
        with timer.phase("backward"):
            engine.backward(loss)
        with timer.phase("retraction"):
            built.manifold.step()  # between backward and engine.step: it writes the fp32 masters
        with timer.phase("optimizer"):
            engine.step()
        window.add(loss, logits, labels)


def _sync_before(step: int, tc, every_steps: int) -> bool:
    """Whether optimizer step `step` (1-based) is followed by an evaluation or a scheduled checkpoint, so that it
    ends with Lookahead's slow/fast synchronisation: what is evaluated, checkpointed and certified is the slow
    weights (LiResNet++ synchronises at every epoch end; the recipes checkpoint once per epoch). A checkpoint on
    a stop request is not scheduled, so it is not synchronised (the trajectory does not depend on it)."""
    return (step == tc.steps or step % every_steps == 0
            or (tc.eval_every > 0 and step % tc.eval_every == 0))


def _divergence(agreed, newly_skipped: int, step: int) -> str | None:
    """Why the run cannot go on (the same answer on every rank), or None."""
    if not math.isfinite(agreed.loss_sum):
        return f"the training loss became {agreed.loss_sum} by step {step}"
    if newly_skipped:
        return f"{newly_skipped} manifold steps had NaN/Inf gradients by step {step}"
    return None


def _diverged_message(reason: str, manager: CheckpointManager) -> str:
    latest = manager.checkpoints()
    where = f"the last checkpoint is {latest[-1][1]}" if latest else "no checkpoint was written"
    return (f"training diverged: {reason}; no checkpoint of these weights is written ({where}). Resume from "
            "it with a lower optim.lr / optim.euclid_lr, optim.grad_clip > 0 or train.precision=fp32")


def _evaluate(step: int, built: Built, cfg: JobConfig, data: DataConfig, runtime: WorkerRuntime,
              tb: ScalarLog) -> dict[str, float]:
    scores = evaluate(built, data, image_size=cfg.model.image_size, radii=cfg.certify.radii(),
                      batches=cfg.train.eval_batches, loss_eps=cfg.loss.eps, runtime=runtime)
    tb.scalars(scores, step)
    return scores


def _log_step(step: int, agreed, window: Window, timer: PhaseTimer, built: Built, cfg: JobConfig,
              tb: ScalarLog) -> dict[str, float]:
    seen = max(agreed.seen, 1.0)
    orth = built.manifold.max_orthogonality_error()  # a collective
    out = {
        "train/loss": agreed.loss_sum / seen, "train/acc": agreed.correct / seen,
        "train/lr": built.manifold.stats.get("lr", cfg.optim.lr),
        "train/images_per_s": agreed.seen / max(window.seconds(), 1e-9),
        "train/eps": training_eps(step - 1, cfg.train.steps, cfg.loss),
        "train/max_orthogonality_error": orth,
        "train/lipschitz_bound": lipschitz_from_orthogonality_error(orth, built.lipschitz_shapes),
        **built.manifold.fast_exp_scalars(),  # branch shares and norm quantiles of the window (collectives)
        **{f"time/{k}": v for k, v in timer.take().items()},
    }
    tb.scalars(out, step)
    window.reset()
    return out


def _progress(rank: int, tc, start_step: int):
    if rank != 0 or not tc.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(total=tc.steps, initial=start_step, desc=f"train {tc.name}", mininterval=5.0)
