"""Checkpoint staging directories left by a killed process are removed by the next rank that starts on the host;
nothing else in the temporary folder is touched (lipnext_scale/ckpt/staging.py)."""

from __future__ import annotations

import os
import socket
import logging
import subprocess
import sys
import threading

from lipnext_scale.ckpt import CheckpointManager
from lipnext_scale.ckpt.staging import new_staging_dir, sweep_orphaned_staging


def _ended_pid() -> int:
    """The pid of a process that has ended (reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def _dir(root, name: str, payload: int = 0):
    d = root / name
    d.mkdir()
    (d / "rank-00000.safetensors").write_bytes(b"x" * payload)
    return d


def test_only_this_hosts_directories_of_ended_processes_are_removed(tmp_path):
    host, dead = socket.gethostname(), _ended_pid()
    orphan = _dir(tmp_path, f"lipnext-ckpt-{host}-{dead}-abc123", payload=1000)
    alive = _dir(tmp_path, f"lipnext-ckpt-{host}-{os.getpid()}-def456")
    keep = [alive,
            _dir(tmp_path, f"lipnext-ckpt-other-host-{dead}-ghi789"),  # a temporary folder shared between hosts
            _dir(tmp_path, "lipnext-ckpt-k2x9q1"),  # an older name, without host and pid: not known to be ours
            _dir(tmp_path, "unrelated")]
    (tmp_path / f"lipnext-ckpt-{host}-{dead}-file").write_bytes(b"a file, not a staging directory")

    assert sweep_orphaned_staging(str(tmp_path)) == (1, 1000)
    assert not orphan.exists() and all(d.is_dir() for d in keep)
    assert (tmp_path / f"lipnext-ckpt-{host}-{dead}-file").is_file()
    assert sweep_orphaned_staging(str(tmp_path)) == (0, 0)  # nothing more to do


def test_ranks_sweeping_at_once_remove_each_directory_once_without_warnings(tmp_path, caplog):
    host, dead = socket.gethostname(), _ended_pid()
    for i in range(60):
        _dir(tmp_path, f"lipnext-ckpt-{host}-{dead}-{i:03d}", payload=100)
    results: list[tuple[int, int]] = []
    with caplog.at_level(logging.WARNING, logger="lipnext_scale.ckpt.staging"):
        sweepers = [threading.Thread(target=lambda: results.append(sweep_orphaned_staging(str(tmp_path))))
                    for _ in range(4)]
        for t in sweepers:
            t.start()
        for t in sweepers:
            t.join()
    assert sum(n for n, _ in results) == 60 and sum(b for _, b in results) == 60 * 100, results
    assert not list(tmp_path.iterdir()) and not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_new_staging_directory_is_named_after_this_process_and_survives_a_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    staging = new_staging_dir()
    assert os.path.dirname(staging) == str(tmp_path)
    assert os.path.basename(staging).startswith(f"lipnext-ckpt-{socket.gethostname()}-{os.getpid()}-")
    assert sweep_orphaned_staging() == (0, 0) and os.path.isdir(staging)


def test_a_saving_rank_sweeps_when_its_manager_starts(tmp_path, monkeypatch):
    """A restarted worker's CheckpointManager (one with a report: a rank that saves) sweeps; the driver's does
    not need to."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    orphan = _dir(temp, f"lipnext-ckpt-{socket.gethostname()}-{_ended_pid()}-abc123")
    CheckpointManager(str(tmp_path / "run"))
    assert orphan.is_dir()
    CheckpointManager(str(tmp_path / "run"), report=lambda metrics, local, name: False)
    assert not orphan.exists()


def test_a_missing_temporary_folder_is_nothing_to_sweep(tmp_path):
    assert sweep_orphaned_staging(str(tmp_path / "missing")) == (0, 0)
