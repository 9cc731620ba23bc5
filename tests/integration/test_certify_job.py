"""The certification job for real: a local Ray instance, real digits shards from `lipnext prep`, exported
lipnext-tiny models. Results are compared with a brute-force single-process computation that shares no
code with the job beyond the model and the radius formula."""

import io
import os
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from lipnext_scale.certify.certify import certified_radius, head_logits64, model_pair_distances
from lipnext_scale.certify.job import CertifyRuntime, certify_job
from lipnext_scale.certify.model_loading import CertifyError, CertifyRefused
from lipnext_scale.config import CertifyConfig, JobConfig, config_to_dict
from lipnext_scale.eps import parse_eps_list
from lipnext_scale.model import create_model
from lipnext_scale.model.lipschitz import rigorous_lipschitz_bound
from lipnext_scale.ckpt import save_exported

pytestmark = [pytest.mark.distributed]
EPS = "16/255,36/255,72/255"
QUIET = CertifyRuntime(progress=False)


@pytest.fixture(scope="module")
def digits(ray_local, digits_shards):
    return digits_shards(100)


def _read_split(folder, split):
    """Brute-force reader: tarfile + PIL, independent of the job's data path."""
    keys, images, labels = [], [], []
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        members = {}
        with tarfile.open(shard) as tar:
            for info in tar:
                members[info.name] = tar.extractfile(info).read()
        for name in members:
            key, ext = name.split(".", 1)
            if ext == "png":
                keys.append((shard.stem, key))
                img = Image.open(io.BytesIO(members[name])).convert("RGB")
                images.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255)
                labels.append(int(members[f"{key}.cls"]))
    return keys, torch.stack(images), torch.tensor(labels)


def _export(model, out):
    cfg = config_to_dict(JobConfig())
    save_exported(model.state_dict(), cfg, str(out))
    return str(out)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """lipnext-tiny with its head trained briefly on the digits train split (matrices stay orthogonal)."""
    _, x, y = _read_split(digits, "train")
    torch.manual_seed(0)
    model = create_model("lipnext-tiny").eval()
    with torch.no_grad():
        feats = model.features(x)
    opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.head(feats), y).backward()
        opt.step()
    return model, _export(model, tmp_path_factory.mktemp("export") / "tiny")


def _brute_force(model, digits):
    keys, x, y = _read_split(digits, "val")
    lipschitz = max(1.0, rigorous_lipschitz_bound(model))
    with torch.no_grad():  # as the job computes them: fp32 features, a float64 head on the forward's rows
        logits = head_logits64(model.features(x), model.head.rows(), model.head.bias)
    pred, margin, radius = certified_radius(logits, model_pair_distances(model), lipschitz)
    return keys, y, pred, radius, lipschitz


def _check_equal_to_brute_force(table, model, digits, eps):
    keys, y, pred, radius, _ = _brute_force(model, digits)
    ids = zip(table.column("shard").to_pylist(), table.column("key").to_pylist())
    got = {(s, k): i for i, (s, k) in enumerate(ids)}
    assert len(got) == table.num_rows == len(keys) == 300  # every sample, exactly once
    assert set(got) == set(keys)
    order = [got[k] for k in keys]
    assert table.column("label").to_pylist() and [table.column("label")[i].as_py() for i in order] == y.tolist()
    assert [table.column("prediction")[i].as_py() for i in order] == pred.tolist()
    def column(name):
        return torch.tensor([table.column(name)[i].as_py() for i in order], dtype=torch.float64)

    exact = column("radius_exact_arithmetic")
    torch.testing.assert_close(exact, radius, rtol=1e-5, atol=1e-7)  # batching may reorder fp32 sums
    # the floating-point allowances shrink every radius, by no more than the model's uniform bounds allow
    from lipnext_scale.certify.fp_error import float_error_model

    fem = float_error_model(model, max(1.0, rigorous_lipschitz_bound(model)))
    uniform_e, phi = fem.uniform()
    job_radius = column("radius")
    shrink = (exact - job_radius) * max(1.0, rigorous_lipschitz_bound(model))
    assert (shrink > 0).all() and (shrink < 4 * uniform_e + 2 * fem.head_per_norm * phi + 1e-3).all()
    for e in parse_eps_list(eps):
        from lipnext_scale.certify.worker import certified_column

        flags = torch.tensor([table.column(certified_column(e))[i].as_py() for i in order])
        assert torch.equal(flags, (pred == y) & (job_radius > e))


@pytest.mark.slow
def test_two_actors_equal_one_and_brute_force(trained, digits, tmp_path):
    model, ckpt = trained
    one = certify_job(ckpt, str(digits / "val"), str(tmp_path / "one"),
                      CertifyConfig(eps=EPS, actors=1, batch_size=64), QUIET)
    two = certify_job(ckpt, str(digits / "val-manifest.parquet"), str(tmp_path / "two"),
                      CertifyConfig(eps=EPS, actors=2, batch_size=64), QUIET)
    t1 = pq.read_table(tmp_path / "one" / "samples.parquet")
    t2 = pq.read_table(tmp_path / "two" / "samples.parquet")
    assert t1.equals(t2)
    _check_equal_to_brute_force(t1, model, digits, EPS)
    for key in ("samples", "clean_accuracy", "certified_accuracy", "lipschitz"):
        assert one[key] == two[key]
    assert one["data"]["fingerprint"] == two["data"]["fingerprint"]  # same shards, two spellings of the URL
    assert one["clean_accuracy"] > 0.5 and one["certified_accuracy"]["16/255"] > 0
    for name in ("report.json", "certified_accuracy.png", "samples.parquet", "job.json"):
        assert (tmp_path / "two" / name).is_file()
    assert (tmp_path / "two" / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_done_shards(trained, digits, tmp_path):
    _, ckpt = trained
    out = tmp_path / "out"
    first = certify_job(ckpt, str(digits / "val"), str(out), CertifyConfig(eps=EPS, actors=0), QUIET)
    full = pq.read_table(out / "samples.parquet")
    # A job killed after two of three shards: one result missing, a temp file half-written, no report.
    (out / "shards" / "val-000001.parquet").unlink()
    (out / "shards" / "val-000001.parquet.tmp-dead").write_bytes(b"half")
    (out / "samples.parquet").unlink()
    (out / "report.json").unlink()
    again = certify_job(ckpt, str(digits / "val"), str(out), CertifyConfig(eps=EPS, actors=0), QUIET)
    assert again["timing"]["shards_certified_now"] == 1 and again["timing"]["shards_resumed"] == 2
    assert pq.read_table(out / "samples.parquet").equals(full)
    assert again["certified_accuracy"] == first["certified_accuracy"]
    assert again["timing"]["shards_recomputed"] == 0
    with pytest.raises(CertifyError, match="different job"):  # other eps into the same --out
        certify_job(ckpt, str(digits / "val"), str(out), CertifyConfig(eps="0.5", actors=0), QUIET)
    # A result file cut short outside the job (a copy, a full disk): a Ray actor certifies it again and
    # replaces it; the report counts it.
    result = out / "shards" / "val-000002.parquet"
    result.write_bytes(result.read_bytes()[:100])
    fixed = certify_job(ckpt, str(digits / "val"), str(out), CertifyConfig(eps=EPS, actors=1), QUIET)
    assert fixed["timing"]["shards_recomputed"] == 1 and fixed["timing"]["shards_certified_now"] == 1
    assert pq.read_table(out / "samples.parquet").equals(full)
    assert fixed["certified_accuracy"] == first["certified_accuracy"]


def test_scaled_matrix_is_refused_or_certified_with_the_bound(trained, digits, tmp_path):
    model, _ = trained
    bad = create_model("lipnext-tiny")
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.blocks[1].mix.mul_(1.1)
    ckpt = _export(bad, tmp_path / "scaled")
    with pytest.raises(CertifyRefused, match=r"Lipschitz bound .* --allow-approx"):
        certify_job(ckpt, str(digits / "val"), str(tmp_path / "refused"), CertifyConfig(eps=EPS, actors=0), QUIET)
    assert not (tmp_path / "refused").exists()  # refused before any work

    report = certify_job(ckpt, str(digits / "val"), str(tmp_path / "approx"),
                         CertifyConfig(eps=EPS, actors=0, allow_approx=True), QUIET)
    bound = rigorous_lipschitz_bound(bad.eval())
    assert report["lipschitz"]["approx"] and report["lipschitz"]["lipschitz_used"] == pytest.approx(bound)
    assert bound > 1.1 and "divided by the rigorous Lipschitz bound" in report["note"]
    _check_equal_to_brute_force(pq.read_table(tmp_path / "approx" / "samples.parquet"), bad, digits, EPS)


@pytest.mark.slow
def test_pgd_never_breaks_a_certified_point(trained, digits, tmp_path):
    _, ckpt = trained
    report = certify_job(ckpt, str(digits / "val"), str(tmp_path / "pgd"),
                         CertifyConfig(eps=EPS, actors=2, attack="pgd", attack_steps=10), QUIET)
    assert report["certified_accuracy"]["16/255"] > 0  # the check is not vacuous
    assert report["attack"]["broken_certified_points"] == 0 and report["soundness_alarm"] == []
    table = pq.read_table(tmp_path / "pgd" / "samples.parquet")
    assert "pgd_broken@36/255" in table.column_names


@pytest.mark.parametrize("attack,extra", [("pgd", []), ("fmn", ["--attack-steps", "20"])])
def test_false_certificate_raises_the_soundness_alarm(trained, digits, tmp_path, monkeypatch, capsys, attack, extra):
    """Inflate every radius 1000x (a deliberately unsound certificate): either attack must catch it."""
    if attack == "fmn":
        pytest.importorskip("foolbox")  # the `attack` extra (in `dev`, so CI runs this)
    from lipnext_scale import cli
    from lipnext_scale.certify import worker

    def inflated(logits, pair_distances=None, lipschitz=1.0, **allowances):
        pred, margin, radius = certified_radius(logits, pair_distances, lipschitz, **allowances)
        return pred, margin, radius * 1000

    monkeypatch.setattr(worker, "certified_radius", inflated)
    _, ckpt = trained
    rc = cli.main(["certify", ckpt, "--data", str(digits / "val-000000.tar"), "--out", str(tmp_path / "o"),
                   "--actors", "0", "--eps", "1", "--attack", attack, *extra, "--no-progress"])
    assert rc == 1
    assert "SOUNDNESS ALARM" in capsys.readouterr().err


@pytest.mark.slow
def test_fmn_reports_empirical_robust_accuracy_and_never_enters_a_certificate(trained, digits, tmp_path):
    pytest.importorskip("foolbox")  # the `attack` extra (in `dev`, so CI runs this)
    _, ckpt = trained
    report = certify_job(ckpt, str(digits / "val-000000.tar"), str(tmp_path / "fmn"),
                         CertifyConfig(eps=EPS, actors=0, attack="fmn", attack_steps=30), QUIET)
    attack = report["attack"]
    assert attack["broken_certified_points"] == 0 and report["soundness_alarm"] == []
    for eps in report["eps"]:  # lower bound <= upper bound <= clean accuracy
        assert report["certified_accuracy"][eps] <= attack["empirical_robust_accuracy"][eps]
        assert attack["empirical_robust_accuracy"][eps] <= report["clean_accuracy"]
    smallest = attack["min_distance_over_radius"]
    assert smallest["points"] > 0 and smallest["ratio"] > 1.0
    table = pq.read_table(tmp_path / "fmn" / "samples.parquet")
    assert "attack_distance" in table.column_names
    assert np.isfinite(table.column("attack_distance").to_numpy()).mean() > 0.9  # it does find attacks


def test_colliding_eps_is_one_clear_error(tmp_path, capsys):
    from lipnext_scale import cli

    rc = cli.main(["certify", str(tmp_path / "missing"), "--data", str(tmp_path / "x-*.tar"), "--out",
                   str(tmp_path / "o"), "--eps", "36/255,0.1411764705882353", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "same radius (36/255)" in err and len(err.strip().splitlines()) == 1


def _write_shard(path, size, labels):
    with wds.TarWriter(str(path)) as sink:
        for i, label in enumerate(labels):
            buf = io.BytesIO()
            Image.new("RGB", (size, size), (i * 10 % 255, 0, 0)).save(buf, format="PNG")
            sink.write({"__key__": f"s{i:04d}", "png": buf.getvalue(), "cls": str(label).encode()})


@pytest.mark.parametrize("case, message", [
    ("missing_ckpt", "does not exist"),
    ("corrupt_ckpt", "does not match its sha256"),
    ("wrong_image_size", "image is 28x28 but the model takes 32x32"),
    ("wrong_class_count", "has 100 classes .* the model has 10"),
    ("label_out_of_range", "label 12 is outside the model's 10 classes"),
])
def test_bad_input_fails_before_any_work(trained, digits, tmp_path, case, message):
    _, ckpt = trained
    data = str(digits / "val")
    if case == "missing_ckpt":
        ckpt = str(tmp_path / "nope")
    elif case == "corrupt_ckpt":
        ckpt = str(shutil.copytree(ckpt, tmp_path / "corrupt"))
        weights = tmp_path / "corrupt" / "model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[-3] ^= 0x55
        weights.write_bytes(bytes(raw))
    else:
        (tmp_path / "data").mkdir()
        size, labels = (28, [1, 2]) if case == "wrong_image_size" else (32, [12, 1])
        _write_shard(tmp_path / "data" / "val-000000.tar", size, labels if case != "wrong_class_count" else [1])
        if case == "wrong_class_count":
            (tmp_path / "data" / "classes.json").write_text('{"num_classes": 100}')
        data = str(tmp_path / "data" / "val")
    with pytest.raises(CertifyError, match=message):
        certify_job(ckpt, data, str(tmp_path / "out"), CertifyConfig(eps=EPS, actors=2), QUIET)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    from lipnext_scale import cli

    rc = cli.main(["certify", str(tmp_path / "missing"), "--data", str(tmp_path / "x-*.tar"),
                   "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "checkpoint" in capsys.readouterr().err


def _write_training_checkpoint(model, step_dir, world_size=2):
    """A ZeRO-3-partitioned training checkpoint in the training format (`ckpt.format`), 2 ranks."""
    from lipnext_scale.ckpt import write_rank_files
    from lipnext_scale.optim.partition import partition_of

    state = model.state_dict()
    meta = {"step": 5, "world_size": world_size, "param_shapes": {k: list(v.shape) for k, v in state.items()},
            "config": config_to_dict(JobConfig())}
    for rank in range(world_size):
        tensors = {f"fp32/{k}": partition_of(v, rank, world_size) for k, v in state.items()}
        write_rank_files(str(step_dir), rank, tensors, {}, meta if rank == 0 else None)


def test_training_checkpoint_gives_the_exported_models_results(trained, digits, tmp_path):
    model, ckpt = trained
    run = tmp_path / "run"
    _write_training_checkpoint(model, run / "step_00000005")
    exported = certify_job(ckpt, str(digits / "val-000002.tar"), str(tmp_path / "e"),
                           CertifyConfig(eps=EPS, actors=0), QUIET)
    training = certify_job(str(run), str(digits / "val-000002.tar"), str(tmp_path / "t"),
                           CertifyConfig(eps=EPS, actors=0), QUIET)
    assert training["checkpoint"]["kind"] == "training"
    assert training["checkpoint"]["url"].endswith("step_00000005")
    assert training["checkpoint"]["weights_sha256"] == exported["checkpoint"]["weights_sha256"]
    assert pq.read_table(tmp_path / "t" / "samples.parquet").equals(pq.read_table(tmp_path / "e" / "samples.parquet"))

    (run / "step_00000005" / "rank-00001.safetensors").write_bytes(b"truncated")
    with pytest.raises(CertifyError, match="cannot load training checkpoint .*corrupt"):
        certify_job(str(run), str(digits / "val"), str(tmp_path / "bad"), CertifyConfig(eps=EPS, actors=0), QUIET)
    with pytest.raises(CertifyError, match="neither an exported model"):
        certify_job(str(tmp_path / "e"), str(digits / "val"), str(tmp_path / "bad"),
                    CertifyConfig(eps=EPS, actors=0), QUIET)


def test_launcher_runs_the_same_command(trained, digits, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _, ckpt = trained
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(repo / "launchers" / "certify.py"), ckpt, "--data",
                           str(digits / "val-000000.tar"), "--out", str(tmp_path / "o"), "--actors", "0",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "certified acc" in done.stdout and (tmp_path / "o" / "report.json").is_file()
