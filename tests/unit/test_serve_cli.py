"""`lipnext serve` refuses, in one line and before starting Ray, what `lipnext certify` refuses; and GET /model
shows a certification report only when it is about the served weights."""

import json

import pytest
import torch

from lipnext_scale import cli
from lipnext_scale.certify.model_loading import LoadedModel, load_model
from lipnext_scale.ckpt import save_exported
from lipnext_scale.config import JobConfig, config_to_dict
from lipnext_scale.model import create_model
from lipnext_scale.serve.describe import find_report, report_candidates


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(an orthogonal export, one whose first block matrix is scaled by 1.01: a bound far above 1 + tol)."""
    root = tmp_path_factory.mktemp("serve_cli")
    torch.manual_seed(0)
    cfg = config_to_dict(JobConfig())
    cfg["model"].update(width=32, depth=2)
    state = create_model("lipnext-tiny", width=32, depth=2).state_dict()
    save_exported(state, cfg, str(root / "good"))
    name = next(k for k, v in state.items() if v.dim() == 2 and v.shape[0] == v.shape[1])
    save_exported({**state, name: state[name] * 1.01}, cfg, str(root / "bad"))
    return root / "good", root / "bad"


def _serve(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["serve", *argv])
    return rc, capsys.readouterr().err.strip()


def test_weights_certify_refuses_are_refused_in_one_line(exports, capsys, monkeypatch):
    import ray

    started = []  # other tests of the session may have a Ray instance up: watch for a new start instead
    monkeypatch.setattr(ray, "init", lambda *a, **kw: started.append("ray.init"))
    rc, err = _serve(capsys, str(exports[1]), "--port", "18999")
    assert rc == 2 and "not orthogonal enough to certify" in err and len(err.splitlines()) == 1
    assert started == []  # refused before any Ray or Serve process started


@pytest.mark.parametrize("argv, message", [
    (["--host", "localhost"], "give an IP address"),
    (["--port", "0"], "must be in 1..65535"),
    (["--replicas", "0"], "each must be >= 1"),
    (["--eps", "36/255,0.1411764705882353"], "same radius"),
    (["--token-file", "/nonexistent/token"], "cannot read it"),
    (["--report", "/nonexistent/report.json"], "does not exist"),
])
def test_bad_flags_are_refused_in_one_line(exports, capsys, argv, message):
    rc, err = _serve(capsys, str(exports[0]), *argv)
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


def test_missing_checkpoint(tmp_path, capsys):
    rc, err = _serve(capsys, str(tmp_path / "nothing"))
    assert rc == 2 and "does not exist" in err


def test_a_report_is_shown_only_for_the_served_weights(exports, tmp_path):
    loaded = load_model(str(exports[0]))
    assert find_report(loaded, None) is None
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"samples": 3, "checkpoint": {"weights_sha256": loaded.weights_sha256}}))
    assert find_report(loaded, str(report))["report"]["samples"] == 3
    report.write_text(json.dumps({"samples": 3, "checkpoint": {"weights_sha256": "0" * 64}}))
    assert "other weights" in find_report(loaded, str(report))["ignored"]
    report.write_text("{not json")
    assert "unreadable" in find_report(loaded, str(report))["ignored"]


def test_a_training_checkpoint_looks_for_its_runs_in_training_report():
    loaded = LoadedModel(model=None, config={}, weights_sha256="", kind="training", url="/runs/a/step_00000040")
    assert report_candidates(loaded) == ["/runs/a/step_00000040/report.json",
                                         "/runs/a/certify/step_00000040/report.json"]
