"""Checkpoints certified while training runs: the task that certifies one, its records, the run's summary.

Every checkpoint the loop saves is handed to `certify_checkpoint`, in a Ray task of its own, on its own
resources, while the workers keep training (Ray Train's asynchronous validation: train/validation.py wires it,
train/trainer.py, the composition root, builds it). `certify_checkpoint` is `lipnext certify`: the same
`certify_job` (weights checked against their hashes and their Lipschitz bound, float64 margins, Ray actors), on
`certify.data_url` or the eval split. It writes `RunLayout.certification(step)` (report.json, the plot,
status.json) and, through the `scalar_log` the trainer hands in, the clean and certified accuracy to
TensorBoard at the checkpoint's step (`{run}/tensorboard/certify`, a run of its own: two processes never append
to one directory's events).

    driver   check_validation(cfg)             at job start (ConfigError: one line, before any write)
             task_options(cfg), task_kwargs()  the task's Ray resources and keyword arguments
             finish(cfg, run_url, ...)         after fit: certify what Ray never saw, final prune,
                                               {run}/certify/summary.json
    workers  retention(cfg)                    what the CheckpointManager keeps
    task     certify_checkpoint(checkpoint, job=..., run_url=..., scalar_log=...)

The records (`Certification`, status.json) are read and written through ckpt/retention.py, below this module,
because pruning reads them.
"""

from __future__ import annotations

import logging
import posixpath
import time
from types import SimpleNamespace
from typing import Any, Callable

from lipnext_scale.certify.report import certified_score, cra_key
from lipnext_scale.ckpt import CheckpointError, list_checkpoints, read_meta
from lipnext_scale.ckpt.format import META_FILE
from lipnext_scale.ckpt.layout import RunLayout, step_of
from lipnext_scale.ckpt.manager import CheckpointManager
from lipnext_scale.ckpt.retention import (
    Certification, Retention, read_certification, read_status, write_certification,
)
from lipnext_scale.config import ConfigError, JobConfig, config_from_dict, config_to_dict
from lipnext_scale.eps import format_eps, parse_eps_list
from lipnext_scale.storage import exists, is_process_local, join_url, list_dir, write_json

log = logging.getLogger(__name__)

PREFIX = "certify"  # metric and TensorBoard prefix of certificates (the loop's estimates are `estimate/*`)
DEADLINE_GRACE_S = 60.0  # a running record this long past its timeout is one Ray cancelled (or lost)
# scalar_log(url) -> a TensorBoard writer with .scalars(values, step) and .close() (train.tb.ScalarLog)
ScalarLogFactory = Callable[[str], Any]


def certify_data(cfg: JobConfig) -> str:
    return cfg.certify.data_url or cfg.data.eval_url


def enabled(cfg: JobConfig) -> bool:
    return cfg.certify.during_training and bool(certify_data(cfg))


def retention(cfg: JobConfig) -> Retention:
    return Retention(keep_last=cfg.ckpt.keep_last, keep_best=cfg.ckpt.keep_best, best_eps=cfg.ckpt.best_eps(),
                     certified=enabled(cfg), max_waiting=cfg.certify.max_waiting, score=certified_score)


# --------------------------------------------------------------------------------------------------
# Driver side.


def check_validation(cfg: JobConfig) -> None:
    """Start-time checks of certification during training; raises ConfigError naming the fix."""
    best = cfg.ckpt.best_eps()
    radii = cfg.certify.radii()
    if best is not None and best not in radii:
        raise ConfigError(f"ckpt.best_metric={cfg.ckpt.best_metric!r}: {format_eps(best)} is not one of "
                          f"certify.eps={cfg.certify.eps!r}; rank by one of those, e.g. "
                          f"ckpt.best_metric=\"cra@{format_eps(radii[0])}\"")
    if cfg.certify.during_training and not certify_data(cfg):
        log.warning("certify.during_training: neither certify.data_url nor data.eval_url is set, so checkpoints "
                    "are not certified while training%s",
                    " and ckpt.keep_best is ignored" if cfg.ckpt.keep_best else "")
    if not enabled(cfg):
        return
    url = certify_data(cfg)
    if cfg.certify.actors > 0 and is_process_local(url, ConfigError):
        raise ConfigError(f"certify.data_url / data.eval_url {url!r} lives in one process's memory, which the "
                          "certification task cannot read; use a shared path or URL")
    if cfg.certify.data_url:  # data.eval_url was checked with the training data
        from lipnext_scale.certify.data_access import preflight, resolve_shards
        from lipnext_scale.certify.model_loading import CertifyError

        try:
            shards = resolve_shards(url)
            if not shards:
                raise CertifyError("it resolves to no shards")
            preflight(shards, cfg.model.image_size, cfg.model.num_classes, cfg.data.dataset)
        except CertifyError as e:
            raise ConfigError(f"certify.data_url={url!r} is not usable: {e}") from None


def task_options(cfg: JobConfig) -> dict[str, Any]:
    """The certifying task's Ray options. With certify.actors > 0 the task only drives the actors, which take
    certify.resources each; with 0 the task certifies itself and takes them. Call after connecting to Ray (a GPU
    is checked against the cluster)."""
    import ray

    cpus, gpus = cfg.certify.cpus_and_gpus()
    if gpus and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError(f"certify.resources={cfg.certify.resources!r} asks for a GPU but the Ray cluster has "
                          "none; use certify.resources={CPU = 2} or add a GPU node")
    in_task = cfg.certify.actors == 0
    return {"num_cpus": cpus if in_task else 0, "num_gpus": gpus if in_task else 0,
            "max_retries": cfg.certify.retries, "retry_exceptions": True}


def task_kwargs(cfg: JobConfig, run_url: str) -> dict[str, Any]:
    """The task's JSON keyword arguments: the job (as stored) and the run."""
    return {"job": config_to_dict(cfg), "run_url": run_url}


def finish(cfg: JobConfig, run_url: str, scalar_log: ScalarLogFactory | None = None) -> dict[str, Any]:
    """After `fit` (Ray has waited for the certifications, each finished or given up): certify what Ray never
    saw, prune by the final certificates, write `{run}/certify/summary.json` and return it (empty when
    checkpoints are not certified during training)."""
    manager = CheckpointManager(run_url, retention=retention(cfg))
    if enabled(cfg):
        _certify_missed(cfg, run_url, manager, scalar_log)
    manager.prune(settled=True)
    if not enabled(cfg):
        return {}
    summary = summarise(run_url, cfg.ckpt.best_eps())
    write_json(RunLayout(run_url).summary, summary, ConfigError)
    return summary


def _certify_missed(cfg: JobConfig, run_url: str, manager: CheckpointManager,
                    scalar_log: ScalarLogFactory | None) -> None:
    """Certify, in the same task as during training, each complete checkpoint with no certification record:
    one whose report Ray Train lost when a worker died after uploading it but before the controller took the
    report (Ray then never registered it, so never validated it)."""
    import ray

    missed = [(step, url) for step, url in manager.checkpoints()
              if manager.is_complete(url) and read_certification(run_url, step) == Certification()]
    options = task_options(cfg)
    for step, url in missed:
        log.warning("%s was never handed to certification (a worker died before Ray Train registered it); "
                    "certifying it now", url)
        task = ray.remote(certify_checkpoint).options(**options)
        ref = task.remote(SimpleNamespace(path=url), **task_kwargs(cfg, run_url), scalar_log=scalar_log)
        try:
            ray.get(ref, timeout=cfg.certify.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            log.error("certifying %s took longer than certify.timeout_s=%s s; cancelled", url, cfg.certify.timeout_s)
        except Exception as e:  # recorded and logged by the task itself
            log.error("certifying %s failed: %s", url, " ".join(str(e).split())[:500])


def summarise(run_url: str, best_eps: float | None) -> dict[str, Any]:
    """Every checkpoint's certification of the run: state and figures by step, the newest certified one
    and the best kept one (by ckpt.best_metric)."""
    layout = RunLayout(run_url)
    steps = sorted(step for step in (step_of(e.name) for e in list_dir(layout.certify_dir, ConfigError,
                                                                       missing_ok=True)) if step is not None)
    kept = {step for step, _ in list_checkpoints(run_url)}
    rows = []
    for step in steps:
        record = _read_status(run_url, step)
        done = record.get("state") == "done"
        rows.append({"step": step, "state": record.get("state", "queued"),
                     "checkpoint": layout.checkpoint(step), "checkpoint_kept": step in kept,
                     "report": layout.report(step) if done else None,
                     **{k: record[k] for k in ("figures", "lag_s", "error", "attempt") if k in record}})
    done = [r for r in rows if r["state"] == "done"]
    key = f"{PREFIX}/{cra_key(best_eps) if best_eps is not None else 'clean_acc'}"
    best = max((r for r in done if r["checkpoint_kept"] and key in r.get("figures", {})),
               key=lambda r: (r["figures"][key], r["step"]), default=None)
    return {"checkpoints": rows, "latest": done[-1] if done else None, "best": best, "best_metric": key}


def _read_status(run_url: str, step: int) -> dict[str, Any]:
    """The record as written, {} when there is none or it is unreadable (read_certification logs that)."""
    try:
        return read_status(run_url, step) or {}
    except ValueError:
        return {}


def summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The run summary's lines about certificates (merged into run_training's metrics)."""
    if not summary:
        return {}
    done = [r for r in summary["checkpoints"] if r["state"] == "done"]
    out: dict[str, Any] = {f"{PREFIX}/checkpoints_certified": len(done),
                           f"{PREFIX}/checkpoints_not_certified": len(summary["checkpoints"]) - len(done)}
    if summary["latest"]:
        out[f"{PREFIX}/latest_report"] = summary["latest"]["report"]
    best = summary["best"]
    if best:
        out[f"{PREFIX}/best_checkpoint"] = best["checkpoint"]
        out[f"{PREFIX}/best_{summary['best_metric'].split('/', 1)[1]}"] = best["figures"][summary["best_metric"]]
    return out


# --------------------------------------------------------------------------------------------------
# The task: runs in a Ray task per checkpoint (Ray Train's validation function calls it).


def certify_checkpoint(checkpoint, *, job: dict[str, Any], run_url: str,
                       scalar_log: ScalarLogFactory | None = None) -> dict[str, Any]:
    """Certify one stored checkpoint (anything with the `.path` of `{run}/step_XXXXXXXX`) with `certify_job`;
    return `certify/*` figures (merged by Ray Train into the checkpoint's metrics) and write them to TensorBoard
    through `scalar_log` (None: not written). A failure is recorded, logged and raised (Ray retries it
    certify.retries times)."""
    from lipnext_scale.certify.job import CertifyRuntime, certify_job

    cfg = config_from_dict(job)
    cc = cfg.certify
    layout = RunLayout(run_url)
    name = posixpath.basename(str(checkpoint.path).rstrip("/"))
    step = step_of(name)
    if step is None:
        raise CheckpointError(f"validation got {name!r}, which is not a step_XXXXXXXX checkpoint directory")
    ckpt_url, out_url = layout.checkpoint(step), layout.certification(step)
    previous = read_certification(run_url, step)
    attempt = previous.attempt + 1 if previous.state in ("running", "failed") else 1
    attempts = 1 + cc.retries
    if previous.state == "skipped":  # superseded while it waited (certify.max_waiting), or after the run's end
        log.warning("not certifying %s: skipped (%s)", ckpt_url, _read_status(run_url, step).get("reason", ""))
        return {f"{PREFIX}/skipped": 1.0}
    if not exists(join_url(ckpt_url, META_FILE)):  # superseded and pruned just as Ray started this task
        write_certification(run_url, step, Certification("skipped", attempt, attempts),
                            reason="the checkpoint was deleted before its certification started")
        log.warning("not certifying %s: it was deleted (superseded) before its certification started", ckpt_url)
        return {f"{PREFIX}/skipped": 1.0}
    if _past_final_wait(cfg, layout, step):
        write_certification(run_url, step, Certification("skipped", attempt, attempts),
                            reason=f"training ended more than certify.final_wait_s={cc.final_wait_s} s ago")
        log.warning("not certifying %s: training ended more than certify.final_wait_s=%s s ago", ckpt_url,
                    cc.final_wait_s)
        return {f"{PREFIX}/skipped": 1.0}
    started = time.time()
    write_certification(run_url, step, Certification("running", attempt, attempts,
                                                     started + cc.timeout_s + DEADLINE_GRACE_S), started=started)
    cpus, gpus = cc.cpus_and_gpus()
    try:
        report = certify_job(ckpt_url, certify_data(cfg), out_url, cc,
                             CertifyRuntime(device="cuda" if gpus else "cpu", threads_per_worker=cpus, progress=False))
    except Exception as e:
        error = " ".join(f"{type(e).__name__}: {e}".split())[:2000]
        write_certification(run_url, step, Certification("failed", attempt, attempts, error=error),
                            started=started, finished=time.time())
        log.error("certifying %s failed (attempt %d of %d%s): %s", ckpt_url, attempt, attempts,
                  "; it is retried" if attempt < attempts else "", error)
        raise
    finished = time.time()
    figures = certified_figures(report)
    if scalar_log is not None:
        _write_tensorboard(scalar_log(layout.tensorboard(PREFIX)), figures, step)
    alarms = len(report.get("soundness_alarm") or [])
    if alarms:
        log.error("SOUNDNESS ALARM: the attack broke %d certified point(s) of %s; see %s", alarms, ckpt_url, out_url)
    written = _checkpoint_time(ckpt_url)
    write_certification(run_url, step, Certification("done", attempt, attempts), started=started,
                        finished=finished, figures=figures, checkpoint_time=written,
                        lag_s=None if written is None else finished - written, soundness_alarms=alarms)
    return {**figures, f"{PREFIX}/report": layout.report(step)}


def certified_figures(report: dict[str, Any]) -> dict[str, float]:
    """certify/clean_acc, certify/cra_<eps> per radius and certify/samples of a certification report."""
    out = {f"{PREFIX}/clean_acc": float(report["clean_accuracy"]), f"{PREFIX}/samples": float(report["samples"])}
    for label, value in report["certified_accuracy"].items():
        out[f"{PREFIX}/{cra_key(parse_eps_list(label)[0])}"] = float(value)
    return out


def _write_tensorboard(tb, figures: dict[str, float], step: int) -> None:
    tb.scalars({k: v for k, v in figures.items() if k != f"{PREFIX}/samples"}, step)
    tb.close()


def _checkpoint_time(ckpt_url: str) -> float | None:
    try:
        return float(read_meta(ckpt_url)["time"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _past_final_wait(cfg: JobConfig, layout: RunLayout, step: int) -> bool:
    """Training ended (its final checkpoint is stored) more than certify.final_wait_s ago, and `step` is not
    that final checkpoint: the end of the run no longer waits for this one."""
    if step >= cfg.train.steps:
        return False
    ended = _checkpoint_time(layout.checkpoint(cfg.train.steps))
    return ended is not None and time.time() - ended > cfg.certify.final_wait_s
