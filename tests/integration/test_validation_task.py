"""The certifying task itself (`certify_checkpoint`; `certify_and_log`, what Ray Train runs per checkpoint, adds
TensorBoard), called in this process on a real training checkpoint and real digits shards (certify.actors=0:
`certify_job` in-process, no Ray):
its report, record and TensorBoard figures; a failure recorded per attempt and raised (for Ray to retry);
the end of a run that no longer waits for an intermediate checkpoint; the start-time checks."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from lipnext_scale.ckpt import write_rank_files
from lipnext_scale.ckpt.retention import read_certification
from lipnext_scale.config import ConfigError, config_to_dict, load_config
from lipnext_scale.certify.during_training import certify_checkpoint, check_validation
from lipnext_scale.train.validation import certify_and_log
from fixtures_data import prepared_digits

TINY = ["model.width=16", "model.depth=1", "certify.actors=0", "train.steps=80"]


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    prepared_digits(out, "val", shard_size=100)
    return out


def _checkpoint(cfg, run, step: int, written: float | None = None) -> SimpleNamespace:
    """A training checkpoint (1 rank) of a freshly initialised model, as the loop writes it."""
    import torch

    from lipnext_scale.model import create_model

    torch.manual_seed(step)
    model = create_model(cfg.model.name, num_classes=10, image_size=32, **cfg.model.overrides())
    state = model.state_dict()
    meta = {"step": step, "world_size": 1, "param_shapes": {k: list(v.shape) for k, v in state.items()},
            "config": config_to_dict(cfg), "time": time.time() if written is None else written}
    path = run / f"step_{step:08d}"
    write_rank_files(str(path), 0, {f"fp32/{k}": v.reshape(-1) for k, v in state.items()}, {}, meta)
    return SimpleNamespace(path=str(path))  # what the task reads of Ray's Checkpoint


def test_a_checkpoint_is_certified_recorded_and_logged(val, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lipnext_scale.certify.model_loading import load_model

    cfg = load_config(None, [*TINY, f"data.eval_url={val}/val-manifest.parquet"])
    ckpt = _checkpoint(cfg, tmp_path, 40)
    figures = certify_and_log(ckpt, job=config_to_dict(cfg), run_url=str(tmp_path))  # what Ray Train runs
    report = json.loads((tmp_path / "certify" / "step_00000040" / "report.json").read_text())
    assert report["samples"] == 300 and report["checkpoint"]["url"] == ckpt.path
    assert report["checkpoint"]["weights_sha256"] == load_model(ckpt.path).weights_sha256
    assert figures["certify/clean_acc"] == report["clean_accuracy"]
    assert figures["certify/cra_36_255"] == report["certified_accuracy"]["36/255"]
    assert figures["certify/report"] == str(tmp_path / "certify" / "step_00000040" / "report.json")
    status = json.loads((tmp_path / "certify" / "step_00000040" / "status.json").read_text())
    assert status["state"] == "done" and status["attempt"] == 1 and 0 < status["lag_s"] < 600
    assert read_certification(str(tmp_path), 40).finished(time.time())
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "certify"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("certify/cra_72_255")] == [
        (40, pytest.approx(report["certified_accuracy"]["72/255"]))]


def test_a_failure_is_recorded_per_attempt_and_raised(val, tmp_path):
    from lipnext_scale.certify.model_loading import CertifyRefused

    # tol 0: the rigorous bound of fp32 weights is just above 1, so the weights are refused every time
    cfg = load_config(None, [*TINY, f"data.eval_url={val}/val-manifest.parquet", "certify.lipschitz_tol=0",
                             "certify.retries=1"])
    ckpt = _checkpoint(cfg, tmp_path, 40)
    for attempt in (1, 2):
        with pytest.raises(CertifyRefused, match="not orthogonal enough"):
            certify_checkpoint(ckpt, job=config_to_dict(cfg), run_url=str(tmp_path))
        record = read_certification(str(tmp_path), 40)
        assert (record.state, record.attempt, record.attempts) == ("failed", attempt, 2)
        assert "CertifyRefused" in record.error
        assert record.finished(time.time()) == (attempt == 2)  # kept for the retry, then given up
    assert not (tmp_path / "certify" / "step_00000040" / "report.json").exists()


def test_the_end_of_the_run_stops_waiting_for_intermediate_checkpoints(val, tmp_path):
    cfg = load_config(None, [*TINY, f"data.eval_url={val}/val-manifest.parquet", "certify.final_wait_s=60"])
    ckpt = _checkpoint(cfg, tmp_path, 40)
    final = _checkpoint(cfg, tmp_path, 80, written=time.time() - 120)  # training ended 2 minutes ago
    assert certify_checkpoint(ckpt, job=config_to_dict(cfg), run_url=str(tmp_path)) == {"certify/skipped": 1.0}
    assert read_certification(str(tmp_path), 40).state == "skipped"
    assert "certify/clean_acc" in certify_checkpoint(final, job=config_to_dict(cfg), run_url=str(tmp_path))


def test_a_superseded_checkpoint_is_not_certified(val, tmp_path):
    """A checkpoint pruning recorded as skipped while it waited (certify.max_waiting), or one already deleted
    when Ray starts its task: the task returns at once, records why, and raises nothing (no retry)."""
    import shutil

    from lipnext_scale.ckpt.retention import Certification, write_certification

    cfg = load_config(None, [*TINY, f"data.eval_url={val}/val-manifest.parquet"])
    waited = _checkpoint(cfg, tmp_path, 40)
    write_certification(str(tmp_path), 40, Certification("skipped"), reason="superseded (test)")
    assert certify_checkpoint(waited, job=config_to_dict(cfg), run_url=str(tmp_path)) == {"certify/skipped": 1.0}
    assert not (tmp_path / "certify" / "step_00000040" / "report.json").exists()
    gone = _checkpoint(cfg, tmp_path, 60)
    shutil.rmtree(gone.path)
    assert certify_checkpoint(gone, job=config_to_dict(cfg), run_url=str(tmp_path)) == {"certify/skipped": 1.0}
    record = json.loads((tmp_path / "certify" / "step_00000060" / "status.json").read_text())
    assert record["state"] == "skipped" and "deleted" in record["reason"]


def test_start_checks(val, tmp_path):
    base = [*TINY, f"data.eval_url={val}/val-manifest.parquet"]
    with pytest.raises(ConfigError, match=r"ckpt.best_metric='cra@1/255': 1/255 is not one of certify.eps"):
        check_validation(load_config(None, [*base, 'ckpt.best_metric="cra@1/255"']))
    with pytest.raises(ConfigError, match="certify.data_url=.* is not usable"):
        check_validation(load_config(None, [*base, f"certify.data_url={tmp_path}/none-*.tar"]))
    with pytest.raises(ConfigError, match="certify.data_url=.* is not usable: .*classes"):
        check_validation(load_config(None, [*base, "model.num_classes=3", f"certify.data_url={val}/val-manifest.parquet"]))
    check_validation(load_config(None, [*base, f"certify.data_url={val}/val-000000.tar"]))  # a held-out subset
