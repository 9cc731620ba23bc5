"""Ray Train's side of certification during training: its validation config and the workers' `report`.

What a checkpoint's certification is (the task, its records, the run summary) lives in
`lipnext_scale.certify.during_training`; this module only hands it to Ray Train 2.60 (alpha API): every
checkpoint the loop saves is reported with `validation=True`, Ray Train then runs `certify_and_log` on it in a
Ray task of its own while the workers keep training, and merges the figures it returns into that checkpoint's
metrics. `train/trainer.py` (the composition root) wires it:

    driver   during_training.check_validation(cfg)     at job start
             TorchTrainer(validation_config=validation_config(cfg, run_url), ...)
             during_training.finish(cfg, run_url, scalar_log=ScalarLog)   after fit
    workers  ray_report(cfg)                            the loop's `report`: upload mode, validation request
    task     certify_and_log(checkpoint, job=..., run_url=...)

What we rely on from Ray 2.60 is pinned by tests/integration/test_validation_ray_api.py: the function gets the
stored checkpoint (`.path` under the run); `ray_remote_kwargs` set its resources and retries; a task past
`ValidationTaskConfig.timeout_s` (counted from its launch) is cancelled; `fit()` returns after the queued
validations; the returned dict is merged into the checkpoint's metrics (`Result.metrics` holds the final
checkpoint's certificate); an ASYNC report returns before the upload and the staging directory is deleted
after it. Ray runs one validation at a time and loses the report of a checkpoint whose worker died before
the controller took it (the checkpoint is on disk, unregistered): `during_training.finish` certifies those.
"""

from __future__ import annotations

from typing import Any, Callable

from lipnext_scale.certify import during_training
from lipnext_scale.ckpt.manager import Report, wait_until_staged
from lipnext_scale.config import JobConfig
from lipnext_scale.storage import with_retries
from lipnext_scale.train.tb import ScalarLog


def certify_and_log(checkpoint, *, job: dict[str, Any], run_url: str) -> dict[str, Any]:
    """Ray Train's validation function: the in-run certification task, its figures to the run's TensorBoard."""
    return during_training.certify_checkpoint(checkpoint, job=job, run_url=run_url, scalar_log=ScalarLog)


def validation_config(cfg: JobConfig, run_url: str):
    """Ray Train's ValidationConfig for this job (None when checkpoints are not certified during training).
    Call after connecting to Ray (a GPU is checked against the cluster)."""
    if not during_training.enabled(cfg):
        return None
    from ray.train import ValidationConfig, ValidationTaskConfig

    task = ValidationTaskConfig(fn_kwargs=during_training.task_kwargs(cfg, run_url), timeout_s=cfg.certify.timeout_s)
    return ValidationConfig(certify_and_log, task_config=task, ray_remote_kwargs=during_training.task_options(cfg))


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
    certify = during_training.enabled(cfg)

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
