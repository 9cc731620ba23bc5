"""The certification job's inputs and outputs: bad `--out`, checkpoint URLs, damaged job.json and shard
results, and crashes while writing. A small exported model and two small shards, certified in this
process (actors=0: no Ray; nothing here claims distributed behaviour); every failure must be a one-line
error (CLI exit code 2) or a logged, counted recovery, and no final file name may ever hold half a file."""

import errno
import io
import json
import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from lipnext_scale import cli, storage
from lipnext_scale.certify import job
from lipnext_scale.certify.job import CertifyRuntime, certify_job
from lipnext_scale.config import CertifyConfig, JobConfig, config_to_dict
from lipnext_scale.model import create_model
from lipnext_scale.ckpt import save_exported

EPS = "16/255,36/255"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(checkpoint URL, data URL): lipnext-tiny at width 32, depth 2 and two shards of 6 images."""
    root = tmp_path_factory.mktemp("certify_io")
    torch.manual_seed(0)
    cfg = config_to_dict(JobConfig())
    cfg["model"].update(width=32, depth=2)
    save_exported(create_model("lipnext-tiny", width=32, depth=2).state_dict(), cfg, str(root / "model"))
    (root / "data").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(root / "data" / f"val-{shard:06d}.tar")) as sink:
            for i in range(6):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (40 * i, 20 * shard, 100)).save(buf, format="PNG")
                sink.write({"__key__": f"s{i:04d}", "png": buf.getvalue(), "cls": str(i % 10).encode()})
    return str(root / "model"), str(root / "data" / "val")


def _run(inputs, out, **kw):
    return certify_job(*inputs, str(out), CertifyConfig(eps=EPS, actors=0, batch_size=4, **kw),
                       CertifyRuntime(progress=False))


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["certify", *argv, "--eps", EPS, "--no-progress"])
    return rc, capsys.readouterr().err.strip()


@pytest.fixture
def no_actor(monkeypatch):
    """Fails the test if the job gets as far as certifying (in this process or on Ray actors)."""
    def started(*_args, **_kw):
        raise AssertionError("certification started despite a bad input")

    monkeypatch.setattr(job, "_run_ray", started)
    monkeypatch.setattr(job, "_run_in_process", started)


def test_the_old_workers_flag_names_actors(capsys):
    rc, err = _cli(capsys, "ckpt", "--data", "data", "--workers", "2")
    assert rc == 2 and len(err.splitlines()) == 1 and "--actors" in err


@pytest.mark.parametrize("case, message", [
    ("empty", "--out: empty URL"),
    ("a_file", "is a file, but --out must be a directory"),
    ("under_a_file", "which is a file, but --out must be a directory"),
    ("unknown_protocol", "--out: cannot open 'foo://out'"),
    ("process_local", "lives in this process's memory"),
])
def test_an_impossible_out_fails_before_anything_is_loaded(inputs, tmp_path, capsys, monkeypatch, no_actor,
                                                           case, message):
    def loaded(*_args, **_kw):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(job, "load_model", loaded)
    (tmp_path / "file").write_text("x")
    out = {"empty": "", "a_file": str(tmp_path / "file"), "under_a_file": str(tmp_path / "file" / "out"),
           "unknown_protocol": "foo://out", "process_local": "memory://certify-out"}[case]
    rc, err = _cli(capsys, inputs[0], "--data", inputs[1], "--out", out, "--actors", "2")
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert (tmp_path / "file").read_text() == "x" and not os.path.exists("job.json")


def _deny_writes_under(monkeypatch, folder: Path) -> None:
    """Refuse, as the kernel does for any user but root, to create anything inside `folder` (EACCES from
    the local filesystem under storage.py, so the job's own error handling is what the test sees)."""
    from fsspec.implementations.local import LocalFileSystem

    def refuse(name: str) -> None:
        original = getattr(LocalFileSystem, name)

        def guarded(self, path, *args, **kwargs):
            mode = args[0] if args and name == "_open" else kwargs.get("mode", "wb")
            inside = folder in Path(LocalFileSystem._strip_protocol(str(path))).parents
            if inside and (name != "_open" or any(c in mode for c in "wax+")):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return original(self, path, *args, **kwargs)

        monkeypatch.setattr(LocalFileSystem, name, guarded)

    for name in ("_open", "makedirs", "mkdir", "touch"):
        refuse(name)


def _read_only_dir(tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root (as in CI) ignores permission bits: refuse as they would
        _deny_writes_under(monkeypatch, folder)
    return str(folder)


def _unwritable_system_dir(_tmp_path, _monkeypatch):
    """sysfs: nobody may create a directory at its top, not even root."""
    out = "/sys/lipnext-certify-out"
    try:
        os.mkdir(out)
    except OSError:
        return out
    os.rmdir(out)
    pytest.skip("/sys accepts new directories here")


@pytest.mark.parametrize("make_out", [_read_only_dir, _unwritable_system_dir])
def test_an_unwritable_out_fails_before_any_actor_starts(inputs, tmp_path, capsys, monkeypatch, no_actor, make_out):
    out = make_out(tmp_path, monkeypatch)
    rc, err = _cli(capsys, inputs[0], "--data", inputs[1], "--out", out, "--actors", "2")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"cannot write '{out}/job.json'" in err and "permissions" in err
    assert not os.path.isdir(out) or not os.listdir(out)  # not even a temporary file left behind


def test_an_unknown_checkpoint_protocol_is_one_line(inputs, tmp_path, capsys):
    rc, err = _cli(capsys, "foo://x", "--data", inputs[1], "--out", str(tmp_path / "o"), "--actors", "0")
    assert rc == 2 and len(err.splitlines()) == 1 and "checkpoint: cannot open 'foo://x'" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe\x00 not utf-8", b"[1, 2]"],
                         ids=["empty", "garbage", "not_utf8", "not_an_object"])
def test_a_corrupt_job_file_says_what_to_do(inputs, tmp_path, capsys, no_actor, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_bytes(content)
    rc, err = _cli(capsys, inputs[0], "--data", inputs[1], "--out", str(out), "--actors", "0")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "job.json" in err and f"delete '{out}' to start over, or choose another --out" in err
    assert (out / "job.json").read_bytes() == content  # nothing of the user's is touched


def test_results_without_a_job_file_are_not_reused(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    _run(inputs, out)
    (out / "job.json").unlink()
    rc, err = _cli(capsys, inputs[0], "--data", inputs[1], "--out", str(out), "--actors", "0")
    assert rc == 2 and len(err.splitlines()) == 1 and "holds shard results but no job.json" in err, err


@pytest.mark.parametrize("damage", [lambda raw: raw[: len(raw) // 2], lambda raw: b""], ids=["cut_short", "empty"])
def test_a_broken_shard_result_is_recomputed_logged_and_counted(inputs, tmp_path, caplog, damage):
    out = tmp_path / "out"
    first = _run(inputs, out)
    full = pq.read_table(out / "samples.parquet")
    result = out / "shards" / "val-000001.parquet"
    result.write_bytes(damage(result.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="lipnext_scale.certify.job"):
        again = _run(inputs, out)
    timing = again["timing"]
    assert timing["shards_recomputed"] == 1 and timing["shards_certified_now"] == 1
    assert timing["shards_resumed"] == 1 and first["timing"]["shards_recomputed"] == 0
    assert pq.read_table(result).equals(full.slice(6, 6))  # replaced by a complete file
    assert pq.read_table(out / "samples.parquet").equals(full)
    assert again["certified_accuracy"] == first["certified_accuracy"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "val-000001.parquet" in warned[0] and "unreadable" in warned[0]


class Killed(BaseException):
    """The process dies here (as under SIGKILL: no exception handler runs, nothing is cleaned up)."""


def _die_while_writing(monkeypatch, final_name: str) -> None:
    """The next write of `final_name` puts half its bytes on disk, then the process dies."""
    from fsspec.implementations.local import LocalFileSystem

    real_open = LocalFileSystem._open

    def _open(self, path, mode="rb", *args, **kwargs):
        f = real_open(self, path, mode, *args, **kwargs)
        name = os.path.basename(path)
        if "w" in mode and (name == final_name or name.startswith(f"{final_name}.tmp-")):
            def write_half(data):
                f.f.write(bytes(data)[: len(data) // 2])
                f.f.flush()
                raise Killed(final_name)

            f.write = write_half
        return f

    monkeypatch.setattr(LocalFileSystem, "_open", _open)
    monkeypatch.setattr(storage, "_remove_quietly", lambda *args, **kwargs: None)  # a dead process cleans nothing


def _complete_files(out) -> dict[str, bytes]:
    """Every file under a final name (not a *.tmp-* sibling), each checked to be whole."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and ".tmp-" not in path.name:
            raw = path.read_bytes()
            if path.suffix == ".json":
                assert isinstance(json.loads(raw), dict), path
            elif path.suffix == ".parquet":
                pq.read_table(path)
            else:
                assert path.suffix == ".png" and raw.startswith(b"\x89PNG") and raw.endswith(b"IEND\xaeB`\x82"), path
            files[str(path.relative_to(out))] = raw
    return files


def test_a_crash_in_the_middle_of_any_write_leaves_no_half_file(inputs, tmp_path, monkeypatch):
    """The job dies while writing each of its files in turn, and is rerun after each crash: no final name
    ever holds half a file, and the last run reports what an uninterrupted run reports."""
    reference = _run(inputs, tmp_path / "reference")
    out = tmp_path / "out"
    for final_name in ("job.json", "val-000001.parquet", "samples.parquet", "certified_accuracy.png",
                       "report.json"):
        with monkeypatch.context() as m:
            _die_while_writing(m, final_name)
            with pytest.raises(Killed):
                _run(inputs, out)
        files = _complete_files(out)
        assert not any(name.endswith(final_name) for name in files), final_name  # died before the rename
        assert any(p.name.startswith(f"{final_name}.tmp-") for p in out.rglob("*")), "no half file at all"
    report = _run(inputs, out)
    assert report["certified_accuracy"] == reference["certified_accuracy"]
    assert pq.read_table(out / "samples.parquet").equals(pq.read_table(tmp_path / "reference" / "samples.parquet"))
    assert set(_complete_files(out)) == set(_complete_files(tmp_path / "reference"))

    # a rerun over a finished job that dies while rewriting its report keeps the old, whole files
    before = _complete_files(out)
    for final_name in ("samples.parquet", "certified_accuracy.png", "report.json"):
        with monkeypatch.context() as m:
            _die_while_writing(m, final_name)
            with pytest.raises(Killed):
                _run(inputs, out)
        assert _complete_files(out)[final_name] == before[final_name]
