"""The exported-model format: round trip, and clear failures for every way an export can be wrong."""

import json

import pytest
import torch

from lipnext_scale.config import JobConfig, config_to_dict
from lipnext_scale.model import create_model
from lipnext_scale.ckpt import ExportError, is_exported, load_exported, save_exported


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = create_model("lipnext-tiny", width=32, depth=2)
    cfg = config_to_dict(JobConfig())
    cfg["model"].update(width=32, depth=2)
    out = tmp_path / "export"
    save_exported(model.state_dict(), cfg, str(out))
    return model, cfg, out


def test_round_trip_is_exact_and_hashed(exported):
    model, cfg, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    assert is_exported(str(out)) and not is_exported(str(out.parent))
    state, config = load_exported(f"file://{out}")
    assert config == json.loads(json.dumps(cfg))
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["model.safetensors"]["size"] == (out / "model.safetensors").stat().st_size
    assert "torch" in manifest["versions"]
    assert not list(out.parent.glob("*.tmp-*"))  # nothing half-written left behind


def test_existing_output_needs_overwrite(exported):
    model, cfg, out = exported
    with pytest.raises(ExportError, match="already exists"):
        save_exported(model.state_dict(), cfg, str(out))
    save_exported(model.state_dict(), cfg, str(out), overwrite=True)
    load_exported(str(out))


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda out: (out / "manifest.json").unlink(), "no manifest.json"),
    (lambda out: (out / "config.json").write_text("{}"), "config.json does not match its sha256"),
    (lambda out: (out / "manifest.json").write_text("not json"), "not valid JSON"),
])
def test_damaged_export_fails_clearly(exported, damage, message):
    _, _, out = exported
    damage(out)
    with pytest.raises(ExportError, match=message):
        load_exported(str(out))


def test_weights_that_do_not_fit_the_config_are_rejected(exported, tmp_path):
    model, cfg, _ = exported
    state = dict(model.state_dict())
    with pytest.raises(ExportError, match="unexpected"):
        save_exported({**state, "extra.weight": torch.zeros(2)}, cfg, str(tmp_path / "a"))
    state.pop("head.bias")
    with pytest.raises(ExportError, match="missing"):
        save_exported(state, cfg, str(tmp_path / "b"))
    with pytest.raises(ExportError, match="wrong shapes"):  # a width-32 model under a width-64 config
        save_exported(model.state_dict(), config_to_dict(JobConfig()), str(tmp_path / "c"))
    with pytest.raises(ExportError, match="needs a \\[model\\] section"):
        save_exported(model.state_dict(), {}, str(tmp_path / "d"))
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_missing_url(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load_exported(str(tmp_path / "nothing"))


def test_overwrite_replaces_only_an_existing_export(exported, tmp_path):
    model, cfg, out = exported
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(ExportError, match="is a file, not an exported model"):
        save_exported(model.state_dict(), cfg, str(a_file), overwrite=True)
    assert a_file.read_text() == "keep me"
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "table.csv").write_text("a,b")
    with pytest.raises(ExportError, match="is a folder that is not an exported model"):
        save_exported(model.state_dict(), cfg, str(folder), overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["table.csv"]
    save_exported({k: v * 0 + 1 if k == "head.bias" else v for k, v in model.state_dict().items()}, cfg, str(out),
                  overwrite=True)
    assert torch.equal(load_exported(str(out))[0]["head.bias"], torch.ones_like(model.head.bias))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "notes.txt", "results"]  # no .old-*/.tmp-*


def test_export_cli_accepts_a_run_directory_as_certify_does(exported, tmp_path, capsys):
    from lipnext_scale.cli import main
    from lipnext_scale.ckpt import write_rank_files

    model, cfg, _ = exported
    state = {n: p.detach() for n, p in model.named_parameters()}
    run = tmp_path / "run"
    for step in (3, 5):
        meta = {"step": step, "world_size": 1, "param_shapes": {n: list(p.shape) for n, p in state.items()},
                "config": cfg}
        write_rank_files(str(run / f"step_{step:08d}"), 0, {f"fp32/{n}": p.reshape(-1) for n, p in state.items()},
                         {}, meta)
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert f"exported {run}/step_00000005 -> " in capsys.readouterr().out
    assert torch.equal(load_exported(str(tmp_path / "out"))[0]["head.direction"], state["head.direction"])
    assert main(["export", str(run), str(tmp_path / "out")]) == 2  # exists: one line, no traceback
    assert "already exists" in capsys.readouterr().err
