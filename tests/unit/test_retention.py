"""Checkpoint retention: the newest complete checkpoints, the best certified ones, and never one still being
certified or uploaded. The rule is a pure function (tested against hand-worked cases); `prune` is tested on
real checkpoint directories (`write_rank_files`) with certification records as the certifying task writes them."""

import json
import math
import shutil
import time

import pytest
import torch

from lipnext_scale.ckpt import checkpoint_dir_name, write_rank_files
from lipnext_scale.ckpt.manager import CheckpointManager
from lipnext_scale.certify.report import certified_score
from lipnext_scale.ckpt.layout import RunLayout
from lipnext_scale.ckpt.retention import (
    Certification, Retention, read_certification, retained, superseded, write_certification,
)
from lipnext_scale.config import ConfigError, load_config

SHAPES = {"w": [4, 4]}


def _checkpoint(run, step: int, world: int = 2) -> None:
    for r in range(world):
        meta = {"step": step, "world_size": world, "param_shapes": SHAPES, "time": time.time()} if r == 0 else None
        write_rank_files(str(run / checkpoint_dir_name(step)), r, {"fp32/w": torch.ones(8) * step}, {"r": r}, meta)


def _certified(run, step: int, clean: float, cra: float) -> None:
    """What the certifying task leaves: report.json (the certificate) and a done record."""
    out = run / "certify" / checkpoint_dir_name(step)
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps({"clean_accuracy": clean, "certified_accuracy": {"36/255": cra}}))
    write_certification(str(run), step, Certification("done", 1, 2))


def _steps(run) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step_*"))


@pytest.mark.parametrize("complete,scores,unfinished,last,best,kept", [
    ([1, 2, 3, 4], {}, set(), 2, 0, {3, 4}),  # by age only
    ([1, 2, 3, 4], {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.2}, set(), 1, 1, {2, 4}),  # newest + best
    ([1, 2, 3, 4], {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.2}, set(), 1, 2, {1, 2, 4}),
    ([1, 2, 3, 4], {1: 0.3, 2: 0.3, 3: 0.3}, set(), 1, 1, {3, 4}),  # a tie goes to the newer checkpoint
    ([1, 2, 3, 4], {2: 0.9}, {1, 3}, 1, 1, {1, 2, 3, 4}),  # still being certified: kept
    ([1, 2, 3], {1: 0.9, 2: None, 3: 0.1}, set(), 1, 5, {1, 3}),  # no report: not ranked
    ([], {}, {7}, 1, 1, set()),  # only complete checkpoints are ever candidates
    ([1, 2, 3], {1: math.nan, 2: 0.8, 3: 0.5}, set(), 1, 1, {1, 2, 3}),  # NaN: kept, never ranked above 0.8
    ([1, 2, 3], {1: 0.8, 2: math.inf, 3: 0.5}, set(), 1, 1, {1, 2, 3}),  # inf: kept, never "the best"
    ([1, 2, 3], {1: 0.9, 2: 0.1}, set(), 0, 0, {3}),  # the newest complete one, whatever keep_last says
])
def test_retained_keeps_newest_best_and_unfinished(complete, scores, unfinished, last, best, kept):
    assert retained(complete, scores, unfinished, last, best) == kept


def test_prune_keeps_newest_and_best_certified_and_never_one_being_certified(tmp_path):
    run = tmp_path
    for step in (10, 20, 30, 40, 50):
        _checkpoint(run, step)
    _certified(run, 10, clean=0.50, cra=0.40)
    _certified(run, 20, clean=0.90, cra=0.10)  # best clean accuracy, poor CRA
    _certified(run, 30, clean=0.60, cra=0.20)
    write_certification(str(run), 40, Certification("running", 1, 2, deadline=time.time() + 3600))
    # 50: nothing written yet (queued behind 40)
    manager = CheckpointManager(str(run), retention=Retention(keep_last=1, keep_best=1, best_eps=36 / 255,
                                                              certified=True, score=certified_score))
    assert manager.prune() == [f"{run}/step_00000020", f"{run}/step_00000030"]
    assert _steps(run) == [10, 40, 50]  # best CRA (10), being certified (40), newest (50)
    assert (run / "certify" / "step_00000020" / "report.json").is_file()  # certificates are never deleted

    _certified(run, 50, clean=0.70, cra=0.45)  # the newest is now also the best
    write_certification(str(run), 40, Certification("failed", 2, 2, error="CertifyRefused: ..."))  # given up
    assert manager.prune() == [f"{run}/step_00000010", f"{run}/step_00000040"]
    assert _steps(run) == [50]


def test_an_unreadable_or_nan_score_never_costs_a_checkpoint(tmp_path, caplog):
    """Issue 25: keep_last=1, keep_best=1. (a) The best checkpoint's report.json is cut short: it is kept
    (it was deleted, and a worse one kept). (b) An older report reads NaN: NaN is not ranked (it sorted first
    and the true best was deleted); its checkpoint is kept too. Each kept one is named in the log with why."""
    retention = Retention(keep_last=1, keep_best=1, best_eps=36 / 255, certified=True, score=certified_score)
    truncated, nan = tmp_path / "truncated", tmp_path / "nan"
    for run, scores in ((truncated, (0.8, 0.5, 0.1, 0.2)), (nan, (0.1, 0.8, 0.5, 0.3))):
        for step, cra in zip((10, 20, 30, 40), scores):
            _checkpoint(run, step, world=1)
            _certified(run, step, clean=0.9, cra=cra)
    report = truncated / "certify" / "step_00000010" / "report.json"
    report.write_bytes(report.read_bytes()[:25])
    (nan / "certify" / "step_00000010" / "report.json").write_text(
        '{"clean_accuracy": 0.9, "certified_accuracy": {"36/255": NaN}}')  # json.dumps(nan) writes this
    with caplog.at_level("WARNING", logger="lipnext_scale.ckpt.manager"):
        assert CheckpointManager(str(truncated), retention=retention).prune() == [f"{truncated}/step_00000030"]
        assert CheckpointManager(str(nan), retention=retention).prune() == [f"{nan}/step_00000030"]
    assert _steps(truncated) == [10, 20, 40]  # unreadable (the true best), the best readable, the newest
    assert _steps(nan) == [10, 20, 40]  # NaN, the true best (0.8), the newest
    kept = [r.getMessage() for r in caplog.records]
    assert any(f"{truncated}/step_00000010 is kept" in m and "report.json" in m and "JSONDecodeError" in m
               for m in kept), kept
    assert any(f"{nan}/step_00000010 is kept" in m and "nan, not a finite number" in m for m in kept), kept


def test_best_metric_clean_ranks_by_clean_accuracy(tmp_path):
    for step, clean in ((1, 0.9), (2, 0.1), (3, 0.2)):
        _checkpoint(tmp_path, step)
        _certified(tmp_path, step, clean=clean, cra=0.0)
    manager = CheckpointManager(str(tmp_path), retention=Retention(keep_last=1, keep_best=1, certified=True,
                                                                   score=certified_score))
    manager.prune()
    assert _steps(tmp_path) == [1, 3]
    assert certified_score(str(tmp_path), 1, None) == 0.9 and certified_score(str(tmp_path), 1, 36 / 255) == 0.0
    assert certified_score(str(tmp_path), 2, None) == 0.1  # a pruned checkpoint's certificate stays
    assert certified_score(str(tmp_path), 4, None) is None  # no report


def test_an_upload_in_progress_never_costs_the_previous_checkpoint(tmp_path):
    """keep_last=1 and the newest checkpoint half uploaded (a crash now must resume from the previous one):
    the partial one is not complete, so the previous complete one is the newest and is kept; the partial one
    is never deleted either (its upload may still be running)."""
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20)
    partial = tmp_path / "step_00000020"
    (partial / "rank-00001.safetensors").unlink()  # rank 1's tensors not uploaded yet
    manager = CheckpointManager(str(tmp_path), keep_last=1)
    assert manager.prune() == [] and _steps(tmp_path) == [10, 20]
    assert manager.latest_valid() == f"{tmp_path}/step_00000010"  # what a restart resumes
    data = (partial / "manifest-rank-00001.json").read_bytes()
    (partial / "manifest-rank-00001.json").unlink()
    assert not manager.is_complete(str(partial))  # a manifest still missing
    (partial / "manifest-rank-00001.json").write_bytes(data)
    shutil.copy(tmp_path / "step_00000010" / "rank-00001.safetensors", partial / "rank-00001.safetensors")
    truncated = (partial / "rank-00001.safetensors").read_bytes()[:-5]
    (partial / "rank-00001.safetensors").write_bytes(truncated)
    assert not manager.is_complete(str(partial))  # a file still being written
    _checkpoint(tmp_path, 20)  # the upload finishes
    assert manager.prune() == [f"{tmp_path}/step_00000010"] and _steps(tmp_path) == [20]


def test_settled_prune_after_the_run_and_lost_certifications(tmp_path):
    for step in (1, 2, 3):
        _checkpoint(tmp_path, step, world=1)
    retention = Retention(keep_last=1, keep_best=0, certified=True, score=certified_score)
    # 1: its task was cancelled (timeout) past the deadline; 2: no record (never started)
    write_certification(str(tmp_path), 1, Certification("running", 1, 1, deadline=time.time() - 1))
    assert read_certification(str(tmp_path), 1).finished(time.time())
    assert read_certification(str(tmp_path), 2) == Certification()  # queued
    manager = CheckpointManager(str(tmp_path), retention=retention)
    assert manager.prune() == [f"{tmp_path}/step_00000001"]
    assert manager.prune(settled=True) == [f"{tmp_path}/step_00000002"]  # the driver, once the run is over
    (tmp_path / "certify" / "step_00000003").mkdir(parents=True)
    (tmp_path / "certify" / "step_00000003" / "status.json").write_text("{not json")
    assert read_certification(str(tmp_path), 3) == Certification(state="running", deadline=math.inf)


def test_a_save_waits_for_the_previous_asynchronous_upload(tmp_path):
    """Back-pressure: while the previous checkpoint's staging directory exists and its files are not all in
    storage, the next save waits; it goes on once the uploader deletes the staging directory, or once every
    staged file is in storage with its size (should the uploader fail to delete it)."""
    import threading

    manager = CheckpointManager(str(tmp_path / "run"))
    manager._wait_for_upload()  # nothing in flight: returns at once
    local, stored = tmp_path / "staging", tmp_path / "run" / "step_00000001"
    local.mkdir()
    (local / "a.bin").write_bytes(b"x" * 10)
    manager._uploading = (str(local), str(stored))
    threading.Timer(0.5, shutil.rmtree, args=(local,)).start()  # the uploader finishes
    started = time.monotonic()
    manager._wait_for_upload()
    assert 0.4 < time.monotonic() - started < 5 and manager._uploading is None

    local.mkdir()
    (local / "a.bin").write_bytes(b"x" * 10)
    stored.mkdir(parents=True)
    (stored / "a.bin").write_bytes(b"x" * 10)
    manager._uploading = (str(local), str(stored))
    started = time.monotonic()
    manager._wait_for_upload()  # all in storage: done, although the staging directory lingers
    assert time.monotonic() - started < 1 and manager._uploading is None


def test_certification_url_and_config_keys():
    assert RunLayout("s3://b/run").certification(40) == "s3://b/run/certify/step_00000040"
    cfg = load_config(None, ["ckpt.keep_best=3", 'ckpt.best_metric="cra@72/255"', "ckpt.upload=sync",
                             "certify.resources={GPU=1}", "certify.retries=0"])
    assert cfg.ckpt.best_eps() == 72 / 255 and cfg.certify.cpus_and_gpus() == (1, 1)
    for bad, says in [("ckpt.best_metric=acc", "use \"clean\""), ("ckpt.upload=later", "choose one of async, sync"),
                      ("certify.resources={TPU=1}", "certify.resources"), ("certify.resources={GPU=2}", "GPU 0 or 1"),
                      ("certify.timeout_s=0", "timeout_s > 0"), ("ckpt.keep_best=-1", "keep_best >= 0"),
                      ("certify.max_waiting=-1", "max_waiting >= 0")]:
        with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
            load_config(None, [bad])


def test_background_staging_is_waited_for_and_its_failure_raised(tmp_path):
    """An asynchronous save writes its staging directory in a background thread; the uploader waits until
    the manifest (written last) is there, and a failed write surfaces as a one-line CheckpointError."""
    import threading

    from lipnext_scale.ckpt import CheckpointError
    from lipnext_scale.ckpt.manager import _write_staging, wait_until_staged

    local = tmp_path / "staging"
    local.mkdir()
    writer = threading.Timer(0.3, _write_staging, args=(str(local), 0, {"fp32/w": torch.ones(4)}, {}, None, {}))
    started = time.monotonic()
    writer.start()
    wait_until_staged(str(local), poll_s=0.01)
    assert time.monotonic() - started >= 0.3 and (local / "manifest-rank-00000.json").is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(Exception):
        _write_staging(str(bad), 0, {"fp32/w": "not a tensor"}, {}, None, {})
    with pytest.raises(CheckpointError, match=f"writing checkpoint files to {bad} failed: .*Error"):
        wait_until_staged(str(bad))


@pytest.mark.parametrize("waiting,bound,skipped", [
    ([1, 2, 3, 4], 2, [1, 2]), ([4, 1, 3], 1, [1, 3]), ([1, 2], 2, []), ([1, 2, 3], 0, []), ([], 2, []),
])
def test_superseded_are_the_waiting_beyond_the_newest_bound(waiting, bound, skipped):
    assert superseded(waiting, bound) == skipped


def test_a_backlog_of_waiting_certifications_is_bounded(tmp_path):
    """Certification slower than checkpointing: of the checkpoints whose certification has not started, only
    the newest certify.max_waiting are kept waiting; older ones are recorded skipped and pruned, while one
    being certified and the certified best stay."""
    for step in range(1, 7):
        _checkpoint(tmp_path, step, world=1)
    _certified(tmp_path, 1, 0.9, 0.8)  # the best so far
    write_certification(str(tmp_path), 2, Certification("running", 1, 2, deadline=time.time() + 600))
    manager = CheckpointManager(str(tmp_path), retention=Retention(keep_last=1, keep_best=1, best_eps=36 / 255,
                                                                   certified=True, max_waiting=2,
                                                                   score=certified_score))
    assert manager.prune() == [f"{tmp_path}/step_0000000{s}" for s in (3, 4)]
    assert _steps(tmp_path) == [1, 2, 5, 6]  # best, being certified, the 2 newest waiting (6: also keep_last)
    for step in (3, 4):
        record = json.loads((tmp_path / "certify" / f"step_0000000{step}" / "status.json").read_text())
        assert record["state"] == "skipped" and "certify.max_waiting=2" in record["reason"]
    assert read_certification(str(tmp_path), 5) == Certification()  # still waiting
    unbounded = CheckpointManager(str(tmp_path), retention=Retention(keep_last=1, keep_best=1, best_eps=36 / 255,
                                                                     certified=True, max_waiting=0,
                                                                     score=certified_score))
    _checkpoint(tmp_path, 7, world=1)
    assert unbounded.prune() == [] and _steps(tmp_path) == [1, 2, 5, 6, 7]
