"""`lipnext train/export/demo` and the launchers: config building and early, clear failures (no Ray here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from lipnext_scale.cli import main
from lipnext_scale.demo import demo_config, digits_ready
from lipnext_scale.train.cli import build_train_config, dataset_overrides
from lipnext_scale.config import config_to_dict

REPO = Path(__file__).resolve().parents[2]


def load_launcher(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_path_resolves_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_train_config("configs/train/demo.toml", ["train.steps=70"], resume="123")
    assert cfg.train.steps == 70 == cfg.optim.total_steps
    assert cfg.train.resume == "123"  # a path that looks like a number stays a string


def test_dataset_overrides_point_at_both_manifests():
    cfg = build_train_config("configs/train/demo.toml", dataset_overrides("s3://bucket/digits/"))
    assert cfg.data.train_url == "s3://bucket/digits/train-manifest.parquet"
    assert cfg.data.eval_url == "s3://bucket/digits/val-manifest.parquet"


def test_train_rejects_unknown_key_before_starting_anything(capsys):
    assert main(["train", "--config", "configs/train/demo.toml", "--set", "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "train.bogus" in err and "valid keys" in err and "steps" in err


def test_train_missing_config_file(capsys):
    assert main(["train", "--config", "configs/train/nope.toml"]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_train_2b_launcher_builds_its_recipe_and_rejects_bad_keys(capsys):
    launcher = load_launcher("train_2b")
    code = launcher.main(["--data", "s3://b/imagenet", "--storage", "s3://b/runs", "--num-workers", "4",
                          "--set", "model.bogus=1"])
    assert code == 2
    assert "model.bogus" in capsys.readouterr().err
    cfg = build_train_config(launcher.CONFIG, [])
    assert cfg.model.name == "lipnext-2b"


def test_demo_steps_set_run_and_schedule_length(tmp_path):
    cfg = demo_config(tmp_path, "d", 3, [])
    assert cfg.train.steps == cfg.optim.total_steps == 3
    assert "total_steps" not in config_to_dict(cfg)["optim"]  # derived, not stored
    assert cfg.optim.warmup_steps <= 3
    assert cfg.train.storage == str(tmp_path) and cfg.train.name == "d"
    assert cfg.data.train_url == f"{tmp_path}/data/digits/train-manifest.parquet"
    assert cfg.model.name == "lipnext-tiny" and cfg.train.num_workers == 2


def test_demo_user_overrides_apply(tmp_path):
    assert demo_config(tmp_path, "d", None, ["optim.lr=0.01"]).optim.lr == 0.01


def test_digits_not_ready_in_empty_dir(tmp_path):
    assert not digits_ready(tmp_path)


def test_export_missing_checkpoint_names_it(tmp_path, capsys):
    missing = tmp_path / "step_00000007"
    assert main(["export", str(missing), str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from lipnext_scale.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_unreachable_data_fails_at_start_naming_the_url(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "train-manifest.parquet"
    code = main(["train", "--config", "configs/train/demo.toml", "--set", f'data.train_url="{missing}"',
                 "--set", f'train.storage="{tmp_path / "runs"}"'])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
