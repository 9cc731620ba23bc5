"""Start-time checks of `run_training` (no Ray, no workers): a bad job fails in seconds, clearly."""

import json
import math
from pathlib import Path

import pytest

from lipnext_scale.config import ConfigError, load_config
from lipnext_scale.model import create_model
from lipnext_scale.train.checkpoint import checkpoint_dir_name, write_rank_files
from lipnext_scale.train.metrics import deepspeed_config, lipschitz_from_orthogonality_error
from lipnext_scale.train.trainer import check_job, read_deepspeed_config, run_url_of

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "train" / "demo.toml")


@pytest.fixture
def job(tmp_path):
    shard = tmp_path / "data" / "train-000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"\0" * 1024)  # existence is what the start check can see without reading data

    def make(*overrides):
        return load_config(DEMO, [
            f"data.train_url={shard}", "data.eval_url=", f"train.storage={tmp_path / 'runs'}", *overrides])
    return make


def test_a_good_job_passes_and_creates_its_run_directory(job, tmp_path):
    run_url, ds = check_job(job())
    assert run_url == f"{tmp_path}/runs/demo" and (tmp_path / "runs" / "demo").is_dir()
    assert ds["zero_optimization"]["stage"] == 3


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"train\.bogus.*valid keys in \[train\]:.*steps"):
        load_config(DEMO, ["train.bogus=1"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(DEMO, ["train.precision=fp16"])


def test_unreachable_data_url_names_the_key_and_url(job, tmp_path):
    missing = tmp_path / "nope" / "train-manifest.parquet"
    with pytest.raises(ConfigError, match=rf"data.train_url='{missing}' is not usable: .*does not exist"):
        check_job(job(f"data.train_url={missing}"))
    with pytest.raises(ConfigError, match="data.eval_url"):
        check_job(job(f"data.eval_url={tmp_path}/nope/val-{{000000..000001}}.tar"))
    with pytest.raises(ConfigError, match="data.train_url is empty"):
        check_job(job("data.train_url="))


def test_unwritable_storage_fails_at_start(job, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"train.storage: cannot write the run directory .*a-file/demo"):
        check_job(job(f"train.storage={blocker}"))
    with pytest.raises(ConfigError, match="train.storage"):
        check_job(job("train.storage=nosuchprotocol://bucket/runs"))


def test_resume_none_refuses_to_overwrite_and_a_bad_resume_path_is_named(job, tmp_path):
    cfg = job("train.resume=none")
    run = tmp_path / "runs" / "demo" / checkpoint_dir_name(5)
    write_rank_files(str(run), 0, {}, {}, {"step": 5, "world_size": 1, "param_shapes": {}})
    with pytest.raises(ConfigError, match="already has checkpoints"):
        check_job(cfg)
    with pytest.raises(ConfigError, match=r"train.resume=.*step_00000009.*lacks manifest-rank-00000.json"):
        check_job(job(f"train.resume={tmp_path}/elsewhere/step_00000009"))


def test_deepspeed_file_checks(job, tmp_path):
    with pytest.raises(ConfigError, match="train.deepspeed='configs/deepspeed/nope.json' not found"):
        check_job(job("train.deepspeed=configs/deepspeed/nope.json"))
    stage2 = tmp_path / "z2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="stage must be 3"):
        check_job(job(f"train.deepspeed={stage2}"))


def test_engine_config_takes_batch_accumulation_clipping_and_precision_from_the_job():
    cfg = load_config(DEMO, ["data.batch_size=8", "train.grad_accum=3",
                                                  "optim.grad_clip=2.5", "train.precision=bf16"])
    base = read_deepspeed_config("configs/deepspeed/zero3_fp32.json")
    out = deepspeed_config({**base, "train_batch_size": 999, "gradient_clipping": 9.0}, cfg, world_size=4)
    assert out["train_micro_batch_size_per_gpu"] == 8 and out["gradient_accumulation_steps"] == 3
    assert out["train_batch_size"] == 8 * 3 * 4 and out["gradient_clipping"] == 2.5
    assert out["bf16"]["enabled"] is True and out["zero_optimization"]["stage"] == 3
    assert base.get("train_batch_size") is None  # the file's dict is not modified


def test_local_storage_becomes_absolute_and_urls_are_kept():
    cfg = load_config(DEMO, ["train.storage=./somewhere", "train.name=x"])
    assert run_url_of(cfg).endswith("/somewhere/x") and run_url_of(cfg).startswith("/")
    cfg = load_config(DEMO, ["train.storage=s3://bucket/runs/", "train.name=x"])
    assert run_url_of(cfg) == "s3://bucket/runs/x"


def test_monitoring_lipschitz_bound():
    assert lipschitz_from_orthogonality_error(0.0, [(4, 4), (8, 4)]) == 1.0
    bound = lipschitz_from_orthogonality_error(1e-3, [(4, 4), (8, 4)])
    assert math.isclose(bound, math.sqrt(1 + 4e-3) ** 2)


def test_recipes_load():
    for name in ("demo", "cifar10_l32w1024", "cifar10_l32w2048", "cifar100", "tiny_imagenet", "imagenet_1b",
                 "imagenet_2b"):
        cfg = load_config(DEMO.replace("demo", name))
        assert cfg.optim.total_steps == cfg.train.steps, name
        # the paper's recipe: EMMA with an eps ramp, FastExp manifold steps, NAdam on the rest (not the demo)
        assert cfg.loss.kind == "emma" and cfg.loss.eps_ramp_end > cfg.loss.eps_ramp_start, name
        assert cfg.optim.retraction == "fast_exp" and cfg.optim.lookahead_k > 0, name
        if name != "demo":
            assert cfg.optim.euclid_optimizer == "nadam" and cfg.optim.grad_clip == 3.0, name
        model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
                             device="meta", **cfg.model.overrides())
        assert model.spec.positional and model.spec.shift_mode == "circular", name
    assert load_config(DEMO.replace("demo", "imagenet_2b")).model.name == "lipnext-2b"
