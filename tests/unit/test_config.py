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


# Issue 12, item 7: NaN/inf and nonsense values are refused at load time, naming the key.
@pytest.mark.parametrize("override,match", [
    ("optim.lr=nan", "optim.lr=nan: must be a finite number"),
    ("optim.euclid_lr=inf", "optim.euclid_lr=inf: must be a finite number"),
    ("loss.eps=nan", "loss.eps=nan: must be a finite number"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("optim.betas=[0.9, 1.5]", r"optim.betas=\(0.9, 1.5\): both must be in \[0, 1\)"),
    ("optim.manifold_betas=[nan, 0.9]", r"optim.manifold_betas\[0\]=nan: must be a finite number"),
    ('train.name=".."', "train.name='..': use letters, digits"),
    ('train.name="a b"', "train.name='a b': use letters, digits"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer=-1: must be >= 0"),
    ("optim.warmup_steps=20", "optim.warmup_steps=20 with a run of train.steps=10"),
    ("data.dataset=mnist", "data.dataset='mnist': choose one of digits, cifar10"),
    ("certify.attack=cw", "certify.attack='cw': choose one of '', pgd, fmn"),
])
def test_nonsense_values_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["train.steps=10", override])


@pytest.mark.parametrize("old,new", [("data.num_workers=2", "data.loader_processes"),
                                     ("certify.workers=2", "certify.actors"),
                                     ("optim.total_steps=5", "the schedule length is train.steps"),
                                     ("optim.polish=true", "optim.polish_every")])
def test_old_keys_name_their_replacement(old, new):
    with pytest.raises(ConfigError, match=new):
        load_config(None, [old])


def test_schedule_length_is_the_run_length():
    cfg = load_config(None, ["train.steps=123"])
    assert cfg.optim.total_steps == 123


def test_stored_configs_of_older_versions_still_load():
    from lipnext_scale.config import config_from_dict, config_to_dict

    stored = config_to_dict(load_config(None, ["train.steps=9"]))
    stored["data"]["num_workers"] = stored["data"].pop("loader_processes")
    stored["certify"]["workers"] = stored["certify"].pop("actors")
    stored["optim"]["total_steps"] = 9
    stored["optim"].pop("polish_every")
    stored["optim"]["polish"] = False  # a bool before the polish became a period
    cfg = config_from_dict(stored)
    assert cfg.data.loader_processes == 2 and cfg.certify.actors == 2 and cfg.optim.total_steps == 9
    assert cfg.optim.polish_every == 0
    stored["optim"]["polish"] = True
    assert config_from_dict(stored).optim.polish_every == 1


# Issue 12, item 11 (config part): an `extends` loop and a non-UTF-8 file are one-line errors.
def test_extends_loop_and_non_utf8_are_named(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="`extends` forms a loop"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "self.toml").write_text('extends = "self.toml"\n')
    with pytest.raises(ConfigError, match="`extends` forms a loop"):
        load_config(tmp_path / "self.toml")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[train]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(latin)


# Issue 24: a model knob is one field of config's `Architecture`; ModelSpec and the model.<knob> overrides
# both follow it.
def test_model_overrides_follow_the_architecture_fields():
    import dataclasses

    from lipnext_scale.config import Architecture, ModelConfig
    from lipnext_scale.model import ModelSpec, get_spec

    knobs = [f.name for f in dataclasses.fields(Architecture)]
    assert [f.name for f in dataclasses.fields(ModelSpec)][:len(knobs)] == knobs
    assert list(ModelConfig.OVERRIDES) == [k for k in knobs if k not in ("num_classes", "image_size")]
    assert [f.name for f in dataclasses.fields(ModelConfig)] == ["name", "num_classes", "image_size",
                                                                 *ModelConfig.OVERRIDES]
    assert load_config().model.overrides() == {}
    cfg = load_config(None, ["model.shift_mode=zero", "model.beta=0.25", "model.positional=false"])
    assert cfg.model.overrides() == {"beta": 0.25, "shift_mode": "zero", "positional": False}
    spec = get_spec(cfg.model.name, **cfg.model.overrides())
    assert (spec.beta, spec.shift_mode, spec.positional, spec.width) == (0.25, "zero", False, 64)
    with pytest.raises(ConfigError, match="model.shift_mode='diagonal': choose one of circular, zero"):
        load_config(None, ["model.shift_mode=diagonal"])
    with pytest.raises(ConfigError, match="model.width='wide': expected an integer"):
        load_config(None, ["model.width=wide"])


def test_one_migration_table_for_files_and_stored_configs():
    from lipnext_scale.config import MIGRATIONS, config_from_dict, config_to_dict

    stored = config_to_dict(load_config())
    for (section, old), migration in MIGRATIONS.items():
        with pytest.raises(ConfigError, match=f"config key {section}.{old} was replaced by"):
            load_config(None, [f"{section}.{old}=1"])
        old_style = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}
        if migration.new is not None:
            old_style[section][old] = old_style[section].pop(migration.new)
        else:
            old_style[section][old] = 1
        assert config_to_dict(config_from_dict(old_style)) == stored


def test_batch_plan_is_the_split_and_the_global_batch():
    from lipnext_scale.config import BatchPlan, TrainConfig

    tc = TrainConfig(num_workers="1-4", global_batch=48)
    assert tc.batch_plan(4, 8) == BatchPlan(micro=6, accumulation=2, global_batch=48)
    assert tc.batch_split(4, 8) == (6, 2)
    plan = tc.batch_plan(3, 8)
    assert plan.micro * plan.accumulation * 3 == plan.global_batch == 48
