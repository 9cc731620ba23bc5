"""Checkpoints certified while training runs: Ray Train's asynchronous validation driving `certify_job`.

Every checkpoint the loop saves is reported with `validation=True`. Ray Train (2.60, alpha API) then runs
`certify_checkpoint` on it in a Ray task of its own, on its own resources, while the workers keep training,
and merges the figures it returns into that checkpoint's metrics. `certify_checkpoint` is `lipnext certify`:
the same `certify_job` (weights checked against their hashes and their Lipschitz bound, float64 margins, Ray
actors), on `certify.data_url` or the eval split. It writes `{run}/certify/step_XXXXXXXX/` (report.json, the
plot, status.json) and the clean and certified accuracy to TensorBoard at the checkpoint's step
(`{run}/tensorboard/certify`, a run of its own: two processes never append to one directory's events).

    driver   check_validation(cfg)                      at job start (ConfigError: one line, before any write)
             TorchTrainer(validation_config=validation_config(cfg, run_url), ...)
             finish(cfg, run_url)                       after fit: certify what Ray never saw, final prune,
                                                        {run}/certify/summary.json
    workers  ray_report(cfg)                            the loop's `report`: upload mode, validation request
    task     certify_checkpoint(checkpoint, job=..., run_url=...)

What we rely on from Ray 2.60 is pinned by tests/integration/test_validation_ray_api.py: the function gets the
stored checkpoint (`.path` under the run); `ray_remote_kwargs` set its resources and retries; a task past
`ValidationTaskConfig.timeout_s` (counted from its launch) is cancelled; `fit()` returns after the queued
validations; the returned dict is merged into the checkpoint's metrics (`Result.metrics` holds the final
checkpoint's certificate); an ASYNC report returns before the upload and the staging directory is deleted
after it. Ray runs one validation at a time and loses the report of a checkpoint whose worker died before
the controller took it (the checkpoint is on disk, unregistered): `finish` certifies those.
"""

from __future__ import annotations

import logging
import posixpath
import time
from typing import Any, Callable

from lipnext_scale.ckpt import CheckpointError, checkpoint_dir_name, list_checkpoints, read_meta
from lipnext_scale.ckpt.manager import CheckpointManager, Report, wait_until_staged
from lipnext_scale.ckpt.retention import (
    CERTIFY_DIR, REPORT_FILE, Certification, Retention, certification_url, read_certification, read_status,
    write_certification,
)
from lipnext_scale.config import ConfigError, JobConfig, config_from_dict, config_to_dict
from lipnext_scale.eps import format_eps, parse_eps_list
from lipnext_scale.storage import exists, is_process_local, join_url, list_dir, with_retries, write_json
from lipnext_scale.train.evaluate import cra_key

log = logging.getLogger(__name__)

PREFIX = "certify"  # metric and TensorBoard prefix of certificates (the loop's estimates are `estimate/*`)
SUMMARY_FILE = "summary.json"
DEADLINE_GRACE_S = 60.0  # a running record this long past its timeout is one Ray cancelled (or lost)


def certify_data(cfg: JobConfig) -> str:
    return cfg.certify.data_url or cfg.data.eval_url


def enabled(cfg: JobConfig) -> bool:
    return cfg.certify.during_training and bool(certify_data(cfg))


def retention(cfg: JobConfig) -> Retention:
    return Retention(keep_last=cfg.ckpt.keep_last, keep_best=cfg.ckpt.keep_best, best_eps=cfg.ckpt.best_eps(),
                     certified=enabled(cfg), max_waiting=cfg.certify.max_waiting)


# --------------------------------------------------------------------------------------------------
# Driver side.


def check_validation(cfg: JobConfig) -> None:
    """Start-time checks of certification during training; raises ConfigError naming the fix."""
    best = cfg.ckpt.best_eps()
    radii = parse_eps_list(cfg.certify.eps)
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
            preflight(shards, cfg.model.image_size, cfg.model.num_classes)
        except CertifyError as e:
            raise ConfigError(f"certify.data_url={url!r} is not usable: {e}") from None


def validation_config(cfg: JobConfig, run_url: str):
    """Ray Train's ValidationConfig for this job (None when checkpoints are not certified during training).
    With certify.actors > 0 the task only drives the actors, which take certify.resources each; with 0 the
    task certifies itself and takes them. Call after ray.init (a GPU is checked against the cluster)."""
    if not enabled(cfg):
        return None
    import ray
    from ray.train import ValidationConfig, ValidationTaskConfig

    cpus, gpus = cfg.certify.cpus_and_gpus()
    if gpus and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError(f"certify.resources={cfg.certify.resources!r} asks for a GPU but the Ray cluster has "
                          "none; use certify.resources={CPU = 2} or add a GPU node")
    in_task = cfg.certify.actors == 0
    remote = {"num_cpus": cpus if in_task else 0, "num_gpus": gpus if in_task else 0,
              "max_retries": cfg.certify.retries, "retry_exceptions": True}
    task = ValidationTaskConfig(fn_kwargs={"job": config_to_dict(cfg), "run_url": run_url},
                                timeout_s=cfg.certify.timeout_s)
    return ValidationConfig(certify_checkpoint, task_config=task, ray_remote_kwargs=remote)


def upload_with_retries(checkpoint, name: str, upload: Callable):
    """`upload(checkpoint, name)` (Ray Train's copy of a staging directory into the run), retried whole on a
    transient storage error (a 503, a reset: the storage layer's `is_transient`), with the same backoff as every
    other write; the files it already copied are overwritten with the same bytes. A checkpoint is only taken for
    complete once every rank's manifest is stored, so a failed attempt is never mistaken for one."""
    return with_retries(f"{name} (from {checkpoint.path})", "uploading checkpoint", lambda: upload(checkpoint, name))


def ray_report(cfg: JobConfig, upload_fn: Callable | None = None) -> Report:
    """The loop's `report` in a Ray Train worker: `ray.train.report` with ckpt.upload's mode, asking for the
    checkpoint's certification when it is on. Returns True when Ray took the staging directory over.

    async: Ray Train's upload thread waits until the CheckpointManager has written the staging directory in
    its own background thread (`waits_for_staging`), then uploads it with retries (`upload_fn`, Ray Train's
    `checkpoint_upload_fn`; None: Ray's own copy into the run directory) and deletes it; the step only
    copied its state in memory. sync: the step writes, uploads and hands the report over before going on."""
    import ray.train
    from ray.train import CheckpointUploadMode

    mode = CheckpointUploadMode.ASYNC if cfg.ckpt.upload == "async" else CheckpointUploadMode.SYNC
    certify = enabled(cfg)

    def upload_when_staged(checkpoint, name: str):
        wait_until_staged(checkpoint.path)
        return upload_with_retries(checkpoint, name, upload_fn or (
            lambda c, n: ray.train.get_context().get_storage().persist_current_checkpoint(c, n)))

    def report(metrics: dict[str, Any], local_dir: str | None, name: str | None) -> bool:
        checkpoint = ray.train.Checkpoint.from_directory(local_dir) if local_dir else None
        # ASYNC for metrics-only reports too: a SYNC report waits until the controller has taken it
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=mode is CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=upload_when_staged if mode is CheckpointUploadMode.ASYNC else upload_fn,
                         validation=certify and checkpoint is not None)
        return checkpoint is not None and mode is CheckpointUploadMode.ASYNC

    report.waits_for_staging = mode is CheckpointUploadMode.ASYNC
    return report


def finish(cfg: JobConfig, run_url: str) -> dict[str, Any]:
    """After `fit` (Ray has waited for the certifications, each finished or given up): certify what Ray never
    saw, prune by the final certificates, write `{run}/certify/summary.json` and return it (empty when
    checkpoints are not certified during training)."""
    manager = CheckpointManager(run_url, retention=retention(cfg))
    if enabled(cfg):
        _certify_missed(cfg, run_url, manager)
    manager.prune(settled=True)
    if not enabled(cfg):
        return {}
    summary = summarise(run_url, cfg.ckpt.best_eps())
    write_json(join_url(run_url, CERTIFY_DIR, SUMMARY_FILE), summary, ConfigError)
    return summary


def _certify_missed(cfg: JobConfig, run_url: str, manager: CheckpointManager) -> None:
    """Certify, in the same task as during training, each complete checkpoint with no certification record:
    one whose report Ray Train lost when a worker died after uploading it but before the controller took the
    report (Ray then never registered it, so never validated it)."""
    import ray
    from ray.train import Checkpoint

    missed = [(step, url) for step, url in manager.checkpoints()
              if manager.is_complete(url) and read_certification(run_url, step) == Certification()]
    config = validation_config(cfg, run_url)
    for step, url in missed:
        log.warning("%s was never handed to certification (a worker died before Ray Train registered it); "
                    "certifying it now", url)
        task = ray.remote(certify_checkpoint).options(**config.ray_remote_kwargs)
        ref = task.remote(Checkpoint(url), **config.task_config.fn_kwargs)
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
    steps = sorted(int(e.name.rsplit("_", 1)[1]) for e in list_dir(join_url(run_url, CERTIFY_DIR), ConfigError,
                                                                   missing_ok=True) if e.name.startswith("step_"))
    kept = {step for step, _ in list_checkpoints(run_url)}
    rows = []
    for step in steps:
        record = _read_status(run_url, step)
        done = record.get("state") == "done"
        rows.append({"step": step, "state": record.get("state", "queued"),
                     "checkpoint": join_url(run_url, checkpoint_dir_name(step)), "checkpoint_kept": step in kept,
                     "report": join_url(certification_url(run_url, step), REPORT_FILE) if done else None,
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
# The task: runs in a Ray task per checkpoint (Ray Train's validation function).


def certify_checkpoint(checkpoint, *, job: dict[str, Any], run_url: str) -> dict[str, Any]:
    """Certify one stored checkpoint with `certify_job`; return `certify/*` figures (merged by Ray Train into
    the checkpoint's metrics). A failure is recorded, logged and raised (Ray retries it certify.retries times)."""
    from lipnext_scale.certify.job import CertifyRuntime, certify_job

    cfg = config_from_dict(job)
    cc = cfg.certify
    name = posixpath.basename(str(checkpoint.path).rstrip("/"))
    step = _step_of(name)
    ckpt_url, out_url = join_url(run_url, name), certification_url(run_url, step)
    previous = read_certification(run_url, step)
    attempt = previous.attempt + 1 if previous.state in ("running", "failed") else 1
    attempts = 1 + cc.retries
    if previous.state == "skipped":  # superseded while it waited (certify.max_waiting), or after the run's end
        log.warning("not certifying %s: skipped (%s)", ckpt_url, _read_status(run_url, step).get("reason", ""))
        return {f"{PREFIX}/skipped": 1.0}
    if not exists(join_url(ckpt_url, "meta.json")):  # superseded and pruned just as Ray started this task
        write_certification(run_url, step, Certification("skipped", attempt, attempts),
                            reason="the checkpoint was deleted before its certification started")
        log.warning("not certifying %s: it was deleted (superseded) before its certification started", ckpt_url)
        return {f"{PREFIX}/skipped": 1.0}
    if _past_final_wait(cfg, run_url, step):
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
    _write_tensorboard(run_url, figures, step)
    alarms = len(report.get("soundness_alarm") or [])
    if alarms:
        log.error("SOUNDNESS ALARM: the attack broke %d certified point(s) of %s; see %s", alarms, ckpt_url, out_url)
    written = _checkpoint_time(ckpt_url)
    write_certification(run_url, step, Certification("done", attempt, attempts), started=started,
                        finished=finished, figures=figures, checkpoint_time=written,
                        lag_s=None if written is None else finished - written, soundness_alarms=alarms)
    return {**figures, f"{PREFIX}/report": join_url(out_url, REPORT_FILE)}


def certified_figures(report: dict[str, Any]) -> dict[str, float]:
    """certify/clean_acc, certify/cra_<eps> per radius and certify/samples of a certification report."""
    out = {f"{PREFIX}/clean_acc": float(report["clean_accuracy"]), f"{PREFIX}/samples": float(report["samples"])}
    for label, value in report["certified_accuracy"].items():
        out[f"{PREFIX}/{cra_key(parse_eps_list(label)[0])}"] = float(value)
    return out


def _write_tensorboard(run_url: str, figures: dict[str, float], step: int) -> None:
    from lipnext_scale.train.tb import ScalarLog

    tb = ScalarLog(join_url(run_url, "tensorboard", PREFIX))
    tb.scalars({k: v for k, v in figures.items() if k != f"{PREFIX}/samples"}, step)
    tb.close()


def _step_of(name: str) -> int:
    head, _, digits = name.partition("_")
    if head != "step" or not digits.isdigit():
        raise CheckpointError(f"validation got {name!r}, which is not a step_XXXXXXXX checkpoint directory")
    return int(digits)


def _checkpoint_time(ckpt_url: str) -> float | None:
    try:
        return float(read_meta(ckpt_url)["time"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _past_final_wait(cfg: JobConfig, run_url: str, step: int) -> bool:
    """Training ended (its final checkpoint is stored) more than certify.final_wait_s ago, and `step` is not
    that final checkpoint: the end of the run no longer waits for this one."""
    if step >= cfg.train.steps:
        return False
    ended = _checkpoint_time(join_url(run_url, checkpoint_dir_name(cfg.train.steps)))
    return ended is not None and time.time() - ended > cfg.certify.final_wait_s
