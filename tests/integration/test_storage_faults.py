"""Storage faults a run meets at scale (issue 25), each on real components: storage.py, the checkpoint format
and CheckpointManager, the real data loaders over prepared shards, the certification job, Ray actors.

Faults come from `faulty://` (tests/faulty_fs.py): the local file system behind an fsspec protocol that fails a
seeded share of calls (a flaky object store), fails every call under a path (an outage), runs out of space
after N bytes (a full disk) or rewrites a file while it is being read. What every test checks: nothing that
was complete before the fault (checkpoint, shard, report, result) is lost or replaced by a partial one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fixtures_data as fx  # noqa: E402
from faulty_fs import FAULTS  # noqa: E402  (registers faulty://)
from processes import descendants_running  # noqa: E402

from lipnext_scale import storage  # noqa: E402
from lipnext_scale.ckpt import (CheckpointError, checkpoint_dir_name, validate_checkpoint,  # noqa: E402
                                write_rank_files)
from lipnext_scale.ckpt.manager import CheckpointManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"w": [64, 64]}


@pytest.fixture(autouse=True)
def faults(monkeypatch):
    """Fresh faults, and retries without the production backoff (same attempts, millisecond pauses)."""
    FAULTS.reset()
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=8, first_delay_s=0.001, max_delay_s=0.01))
    yield FAULTS
    FAULTS.reset()


def _write_checkpoint(run_url: str, step: int, world: int = 2) -> str:
    url = f"{run_url}/{checkpoint_dir_name(step)}"
    for r in range(world):
        meta = {"step": step, "world_size": world, "param_shapes": SHAPES, "time": time.time()} if r == 0 else None
        write_rank_files(url, r, {"fp32/w": torch.full((2048,), float(step))}, {"r": r}, meta)
    return url


def _faulty(path: Path) -> str:
    return f"faulty://{path}"


# ---------------------------------------------------------------- a flaky object store


def test_transient_errors_are_retried_and_every_write_and_read_succeeds(tmp_path, faults, caplog):
    """One storage call in five fails (ConnectionError, as s3fs/gcsfs raise on a 503 or a reset):
    checkpoint files, shard reads (manifest, open, mid-stream reads) and certification writes are retried
    with backoff and give exactly what a healthy store gives."""
    from lipnext_scale.certify.report import read_shard_result
    from lipnext_scale.certify.worker import write_parquet_atomic
    from lipnext_scale.config import DataConfig
    from lipnext_scale.data.shards import make_eval_loader

    fx.prepared_digits(tmp_path / "data", "val", shard_size=100)
    data = DataConfig(dataset="digits", batch_size=50, loader_processes=0)
    healthy = [k for _, _, keys in make_eval_loader(str(tmp_path / "data" / "val-manifest.parquet"), data,
                                                   image_size=32) for k in keys]
    faults.share = 0.2
    with caplog.at_level("WARNING", logger="lipnext_scale.storage"):
        run = _faulty(tmp_path / "run")
        url = _write_checkpoint(run, 10)  # what each rank writes (checkpoint files, manifests last)
        loader = make_eval_loader(_faulty(tmp_path / "data" / "val-manifest.parquet"), data, image_size=32)
        flaky = [k for _, _, keys in loader for k in keys]
        import pyarrow as pa

        table = pa.table({"key": healthy, "label": list(range(len(healthy)))})
        write_parquet_atomic(table, _faulty(tmp_path / "out" / "shards" / "val-000000.parquet"))
        storage.atomic_write_bytes(_faulty(tmp_path / "out" / "report.json"), b'{"samples": 300}')
        for _ in range(3):  # reading a checkpoint back (resume, certification) under the same faults
            assert validate_checkpoint(url)["step"] == 10
    assert faults.failed > 10 and any("retry 1 of 7" in r.getMessage() for r in caplog.records)
    faults.share = 0.0
    assert validate_checkpoint(url)["step"] == 10  # every file present with its hash
    assert CheckpointManager(run).latest_valid() == url
    assert flaky == healthy and loader.dataset.stats.total == 0  # nothing skipped, nothing read twice
    assert read_shard_result(_faulty(tmp_path / "out" / "shards" / "val-000000.parquet")).equals(table)
    assert not list((tmp_path / "out").rglob("*.tmp-*"))  # failed attempts leave no temporary file


def test_a_permanent_outage_is_one_line_naming_the_url(tmp_path, faults):
    from lipnext_scale.certify.model_loading import CertifyError
    from lipnext_scale.certify.worker import write_parquet_atomic
    from lipnext_scale.data.errors import DataError
    from lipnext_scale.config import DataConfig
    from lipnext_scale.data.shards import make_eval_loader

    fx.prepared_digits(tmp_path / "data", "val", shard_size=100)
    faults.fail_paths = {str(tmp_path)}
    url = _faulty(tmp_path / "run" / "step_00000010")
    with pytest.raises(CheckpointError) as ckpt:
        _write_checkpoint(_faulty(tmp_path / "run"), 10)
    with pytest.raises(DataError) as data:
        list(make_eval_loader(_faulty(tmp_path / "data" / "val-manifest.parquet"),
                              DataConfig(dataset="digits", batch_size=50, loader_processes=0), image_size=32))
    import pyarrow as pa

    out = _faulty(tmp_path / "out" / "shards" / "val-000000.parquet")
    with pytest.raises(CertifyError) as cert:
        write_parquet_atomic(pa.table({"key": ["a"]}), out)
    for raised, named in ((ckpt, f"{url}/"), (data, "val-manifest.parquet"), (cert, out)):
        message = str(raised.value)
        assert "\n" not in message and named in message and "after 8 attempts" in message, message
        assert "ConnectionError" in message and "storage service keeps failing" in message


# ---------------------------------------------------------------- a full disk


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one_and_resumes_it(tmp_path, faults):
    run = _faulty(tmp_path / "run")
    previous = _write_checkpoint(run, 10)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    faults.space = 12_000  # rank 0's tensors fit, rank 1's do not
    with pytest.raises(CheckpointError) as full:
        _write_checkpoint(run, 20)
    message = str(full.value)
    assert "\n" not in message and "step_00000020" in message and "No space left on device" in message
    assert "disk or quota is full" in message
    faults.space = None
    manager = CheckpointManager(run, keep_last=1)
    assert not manager.is_complete(f"{run}/step_00000020")
    assert manager.latest_valid() == previous and manager.start_point("auto").step == 10  # what is resumed
    assert manager.prune() == [] and validate_checkpoint(previous)["step"] == 10
    assert {p: p.read_bytes() for p in before} == before  # the previous checkpoint's bytes, untouched
    assert not list((tmp_path / "run").rglob("*.tmp-*"))


# ---------------------------------------------------------------- shards deleted or rewritten mid-run


def test_a_shard_rewritten_or_deleted_while_training_reads_it_is_skipped_never_used(tmp_path, faults, caplog):
    """Shard 1 is rewritten in place (same size, one label changed) after its first bytes were read; shard 2
    is deleted once training has started. Training reads on; neither one's samples are used (they would be
    other contents than the manifest's), each skip is counted and logged with what did not match."""
    from lipnext_scale.data.manifest import shard_digests
    from lipnext_scale.config import DataConfig
    from lipnext_scale.data.shards import make_train_loader, resolve_shards
    from lipnext_scale.data.streams import read_shards
    from lipnext_scale.data.tar_reader import SkipStats

    shards = fx.prepared_digits(tmp_path, "val", shard_size=100)
    urls = resolve_shards(_faulty(tmp_path / "val-manifest.parquet"))
    key = next(iter(__import__("tarfile").open(shards[1]))).name.split(".")[0]

    def rewrite_once(path: str) -> None:
        if path == str(shards[1]) and not rewrite_once.done:
            rewrite_once.done = True
            fx.flip_label_same_size(shards[1], key)  # mid-read: the reader has its file open already
    rewrite_once.done = False
    faults.on_read = rewrite_once
    stats = SkipStats()
    with caplog.at_level("WARNING", logger="lipnext_scale.data"):
        samples = read_shards(({"url": u} for u in urls + urls), stats, shard_digests(urls), verify_first=True)
        first = next(samples)
        shards[2].unlink()  # deleted while the run streams the data set
        got = [first] + list(samples)
    from_shard = {u: sum(s.shard == u for s in got) for u in urls}
    assert from_shard == {urls[0]: 200, urls[1]: 0, urls[2]: 0}  # shard 0 twice; 1 and 2 never
    assert stats.by_reason == {"whole shard not used": 4}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "val-000001.tar' does not match its manifest (419840 bytes, sha256" in logged
    assert "val-000002.tar' does not match its manifest (cannot be read" in logged

    loader = make_train_loader(_faulty(tmp_path / "val-manifest.parquet"),
                               DataConfig(dataset="digits", batch_size=50, loader_processes=0, shuffle_buffer=0),
                               image_size=32, num_classes=10)
    batches = iter(loader)
    assert sum(len(next(batches)[1]) for _ in range(6)) == 300  # training goes on with the good shard
    assert set(loader.dataset.stats.by_reason) == {"whole shard not used"}


# ---------------------------------------------------------------- SIGTERM during an asynchronous upload

UPLOAD = textwrap.dedent("""
    import os, shutil, signal, sys, threading, time
    from lipnext_scale.ckpt import CheckpointError
    from lipnext_scale.ckpt.manager import CheckpointManager
    run, staging, stall = sys.argv[1], sys.argv[2], sys.argv[3] == "stall"
    url = run + "/step_00000020"

    def upload():  # Ray Train's upload thread: copies the staging directory file by file, in no useful order
        os.makedirs(url, exist_ok=True)
        for i, name in enumerate(sorted(os.listdir(staging), reverse=True)):
            if stall and i == 2:
                time.sleep(3600)  # the object store stops answering
            shutil.copyfile(os.path.join(staging, name), os.path.join(url, name))
            time.sleep(0.3)
        shutil.rmtree(staging)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())  # what the training loop's StopRequest does
    manager = CheckpointManager(run, keep_last=1)
    manager.UPLOAD_WAIT_S = 3.0
    manager._uploading = (staging, url)  # what save() leaves after handing the staging directory over
    threading.Thread(target=upload, daemon=True).start()
    print("uploading", flush=True)
    stop.wait()
    try:
        manager._wait_for_upload()  # the preemption save waits for the previous upload first
    except CheckpointError as e:
        print(e, file=sys.stderr)
        sys.exit(3)
""")


@pytest.mark.parametrize("stall", [False, True])
def test_sigterm_during_an_asynchronous_upload(tmp_path, stall):
    """SIGTERM while the previous checkpoint uploads: the process waits for the upload a bounded time. A
    healthy upload finishes (a complete, valid checkpoint); a stalled one is left as it is, recognisably
    incomplete: never resumed, never pruned as complete, and the process exits in bounded time."""
    run = tmp_path / "run"
    previous = _write_checkpoint(str(run), 10)
    staging = tmp_path / "staging"
    for r in range(2):
        meta = {"step": 20, "world_size": 2, "param_shapes": SHAPES, "time": time.time()} if r == 0 else None
        write_rank_files(str(staging), r, {"fp32/w": torch.full((2048,), 20.0)}, {"r": r}, meta)
    proc = subprocess.Popen([sys.executable, "-c", UPLOAD, str(run), str(staging), "stall" if stall else "go"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "uploading"
        time.sleep(0.5)  # a file or two into the upload
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(timeout=60)
        waited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    manager = CheckpointManager(str(run), keep_last=1)
    url = f"{run}/step_00000020"
    if stall:
        assert code == 3 and waited < 20, err
        assert err.strip().splitlines()[-1].startswith(f"the upload of {url} has not finished after 3 s")
        assert Path(url).is_dir() and not manager.is_complete(url)
        assert manager.latest_valid() == previous and manager.prune() == []  # resumed from, kept
    else:
        assert code == 0 and waited < 20, err
        assert manager.is_complete(url) and validate_checkpoint(url)["step"] == 20
        assert manager.latest_valid() == url


# ---------------------------------------------------------------- a certification actor killed mid-shard


@pytest.mark.distributed
def test_a_certification_actor_killed_halfway_through_a_shard_changes_nothing(tmp_path, ray_local):
    """The actor's process is SIGKILLed while it certifies a shard (one shard's result written, the next not):
    Ray restarts it, the shard is certified again from its start, and samples and report are those of an
    uninterrupted run."""
    import threading

    import pyarrow.parquet as pq

    from lipnext_scale.certify.job import CertifyRuntime, certify_job
    from lipnext_scale.ckpt import save_exported
    from lipnext_scale.config import CertifyConfig, JobConfig, config_to_dict
    from lipnext_scale.model import create_model

    torch.manual_seed(0)
    ckpt = str(tmp_path / "model")
    save_exported(create_model("lipnext-tiny").state_dict(), config_to_dict(JobConfig()), ckpt)
    fx.prepared_digits(tmp_path / "data", "val", shard_size=100)
    data = str(tmp_path / "data" / "val-manifest.parquet")
    kw = dict(eps="36/255", batch_size=2)
    reference = certify_job(ckpt, data, str(tmp_path / "reference"), CertifyConfig(actors=0, **kw),
                            CertifyRuntime(progress=False))

    out = tmp_path / "killed"
    result: dict = {}
    killed_job = CertifyConfig(actors=1, **kw)
    job = threading.Thread(target=lambda: result.update(certify_job(ckpt, data, str(out), killed_job,
                                                                     CertifyRuntime(progress=False))))
    job.start()
    deadline = time.monotonic() + 120
    while not (out / "shards" / "val-000000.parquet").exists():
        assert job.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    # this process started the local Ray instance (conftest), so its actors are our descendants
    (actor,) = descendants_running("ShardCertifier")
    assert not (out / "shards" / "val-000001.parquet").exists()  # halfway: shard 1 under way, not written
    actor.send_signal(signal.SIGKILL)
    job.join(timeout=180)
    assert not job.is_alive() and result, "the job did not finish after its actor was killed"
    assert pq.read_table(out / "samples.parquet").equals(pq.read_table(tmp_path / "reference" / "samples.parquet"))
    same = {k: v for k, v in reference.items() if k != "timing"}
    assert {k: v for k, v in result.items() if k != "timing"} == same
    assert json.loads((out / "report.json").read_text())["certified_accuracy"] == reference["certified_accuracy"]


def test_a_checkpoint_upload_that_fails_transiently_is_retried_whole(tmp_path, monkeypatch):
    """Ray Train's copy of a staging directory into storage (`persist_current_checkpoint` or the run's upload
    function) is retried on a transient error, given up with the error on a permanent one."""
    import shutil
    from types import SimpleNamespace

    from lipnext_scale import storage
    from lipnext_scale.train.validation import upload_with_retries

    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=4, first_delay_s=0.01, max_delay_s=0.02))
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"x" * 1000)
    calls = []

    def flaky_upload(checkpoint, name):
        calls.append(name)
        dest = tmp_path / "run" / name
        shutil.copytree(checkpoint.path, dest, dirs_exist_ok=True)  # partly done, then the service fails
        if len(calls) < 3:
            raise ConnectionError("503 Slow Down")
        return "uploaded"

    assert upload_with_retries(SimpleNamespace(path=str(staging)), "step_00000010", flaky_upload) == "uploaded"
    assert len(calls) == 3 and (tmp_path / "run" / "step_00000010" / "model.safetensors").read_bytes() == b"x" * 1000

    def refused(checkpoint, name):
        calls.append(name)
        raise PermissionError(13, "Access Denied")

    calls.clear()
    with pytest.raises(PermissionError):
        upload_with_retries(SimpleNamespace(path=str(staging)), "step_00000020", refused)
    assert len(calls) == 1  # a permanent error is not retried
