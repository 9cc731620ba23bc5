"""Config loading: TOML + extends + --set overrides; unknown keys and bad values are named."""

import pytest

from lipnext_scale.config import ConfigError, JobConfig, load_config, parse_override


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, JobConfig)
    assert cfg.model.name == "lipnext-tiny"


def test_toml_extends_and_overrides(tmp_path):
    (tmp_path / "base.toml").write_text('[model]\nname = "lipnext-cifar-s"\nnum_classes = 100\n[optim]\nlr = 0.1\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[optim]\nmomentum = 0.5\n')
    cfg = load_config(tmp_path / "child.toml", ["optim.lr=0.2", "model.width=128", "data.train_url=s3://b/x.tar"])
    assert cfg.model.name == "lipnext-cifar-s" and cfg.model.num_classes == 100
    assert cfg.optim.lr == 0.2 and cfg.optim.momentum == 0.5
    assert cfg.model.width == 128
    assert cfg.data.train_url == "s3://b/x.tar"


def test_override_values_are_typed():
    assert parse_override("optim.betas=[0.8, 0.9]") == (["optim", "betas"], [0.8, 0.9])
    assert parse_override("model.name=lipnext-tiny") == (["model", "name"], "lipnext-tiny")
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # int accepted for a float field


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=0.1", r"unknown config key\(s\) optim.lrr; valid keys in \[optim\]: .*lr"),
    ("nosuch.x=1", r"unknown config key\(s\) nosuch"),
    ("optim.lr=fast", "optim.lr='fast': expected a number"),
    ("optim.retraction=svd", "choose one of fast_exp, polar_ns"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("certify.eps=36/0", "division by zero"),
    ("optim.lr", "expected key=value"),
])
def test_bad_config_is_named(override, match):
    with pytest.raises(ConfigError if "eps" not in override else ValueError, match=match):
        load_config(None, [override])


def test_missing_and_invalid_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
