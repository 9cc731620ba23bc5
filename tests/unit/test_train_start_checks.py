"""Start-time checks of `run_training` (no Ray, no workers): a bad job fails in seconds, clearly."""

import json
import math
from pathlib import Path

import pytest

from lipnext_scale.ckpt import CheckpointManager, checkpoint_dir_name, write_rank_files
from lipnext_scale.config import ConfigError, config_to_dict, load_config
from lipnext_scale.model import create_model
from lipnext_scale.model.lipschitz import lipschitz_from_orthogonality_error
from lipnext_scale.train.engine import deepspeed_config
from lipnext_scale.train.preflight import check_job, read_deepspeed_config, run_url_of

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
    start = check_job(job())
    assert start.run_url == f"{tmp_path}/runs/demo" and (tmp_path / "runs" / "demo").is_dir()
    assert start.deepspeed["zero_optimization"]["stage"] == 3 and start.start is None


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
    cfg = load_config(DEMO, ["data.batch_size=8", "train.grad_accum=3", "train.num_workers=4",
                                                  "optim.grad_clip=2.5", "train.precision=bf16"])
    base = read_deepspeed_config("configs/deepspeed/zero3_fp32.json")
    out = deepspeed_config({**base, "train_batch_size": 999, "gradient_clipping": 9.0}, cfg.train,
                           cfg.batch_plan(4), cfg.optim, world_size=4)
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


# --------------------------------------------------------------------------------------------------
# The start checkpoint (issue 12, items 6 and 10) and the data's classes (item 9).

SMALL = ["model.width=16", "model.depth=1"]


def _model_checkpoint(step_dir: Path, cfg, step: int) -> None:
    """A one-rank checkpoint of the model `cfg` describes (its weights at init), as training writes it."""
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
                         **cfg.model.overrides())
    params = {n: p.detach() for n, p in model.named_parameters()}
    meta = {"step": step, "world_size": 1, "param_shapes": {n: list(p.shape) for n, p in params.items()},
            "config": config_to_dict(cfg)}
    write_rank_files(str(step_dir), 0, {f"fp32/{n}": p.reshape(-1) for n, p in params.items()}, {}, meta)


def test_an_explicit_resume_wins_over_the_runs_newer_checkpoints(job, tmp_path):
    cfg = job(*SMALL)
    run = tmp_path / "runs" / "demo"
    _model_checkpoint(run / checkpoint_dir_name(10), cfg, 10)  # the run's newest
    _model_checkpoint(run / checkpoint_dir_name(2), cfg, 2)
    older = tmp_path / "elsewhere" / checkpoint_dir_name(4)
    _model_checkpoint(older, cfg, 4)
    assert check_job(cfg).start.url == f"{run}/step_00000010"  # auto: the run's newest valid one
    start = check_job(job(*SMALL, f"train.resume={older}")).start
    assert (start.url, start.step) == (str(older), 4)  # explicit: it wins
    manager = CheckpointManager(str(run))
    moved = manager.set_aside_after(start)  # the job keeps one line of checkpoints: step 10 moved, not deleted
    assert moved == [f"{run}/step_00000010"] and [s for s, _ in manager.checkpoints()] == [2]
    (aside,) = run.glob("superseded-*")
    assert (aside / "step_00000010" / "meta.json").is_file()
    assert manager.resume_point(start.url) == str(older)  # a worker starts from it ...
    _model_checkpoint(run / checkpoint_dir_name(6), cfg, 6)
    assert manager.resume_point(start.url) == f"{run}/step_00000006"  # ... and after a fault, from this job's newest


def test_resuming_another_models_checkpoint_fails_at_start_before_anything_is_written(job, tmp_path):
    other = tmp_path / "elsewhere" / checkpoint_dir_name(4)
    _model_checkpoint(other, job("model.width=32", "model.depth=1"), 4)
    with pytest.raises(ConfigError, match=r"train.resume: checkpoint .*step_00000004 was trained with another "
                                          r"model \(.*width: checkpoint 32, this run 16"):
        check_job(job(*SMALL, f"train.resume={other}"))
    run = tmp_path / "runs" / "demo"
    assert not (run / "config.json").exists() and not list(run.glob("step_*"))
    _model_checkpoint(run / checkpoint_dir_name(4), job("model.width=32", "model.depth=1"), 4)
    with pytest.raises(ConfigError, match=r"train.resume=auto \(this run's newest checkpoint\).*another model"):
        check_job(job(*SMALL))
    shapes_only = tmp_path / "hand-made" / checkpoint_dir_name(1)  # no stored config: the shapes still decide
    write_rank_files(str(shapes_only), 0, {}, {}, {"step": 1, "world_size": 1, "param_shapes": {"x": [3]}})
    with pytest.raises(ConfigError, match="do not fit this run's model"):
        check_job(job(*SMALL, f"train.resume={shapes_only}"))


def _prepared(tmp_path: Path, name: str, class_counts: list[list[int]], num_classes: int | None) -> str:
    """A train split as `lipnext prep` describes it: shards, and a manifest with per-shard class counts."""
    from lipnext_scale.data.manifest import write_manifest

    out = tmp_path / name
    out.mkdir()
    rows = []
    for i, counts in enumerate(class_counts):
        (out / f"train-{i:06d}.tar").write_bytes(b"\0" * 1024)
        rows.append({"split": "train", "index": i, "shard": f"train-{i:06d}.tar", "samples": sum(counts),
                     "bytes": 1024, "sha256": "0" * 64, "class_counts": counts, "plan_digest": "x"})
    meta = {"complete": True, "num_shards": len(rows), **({"num_classes": num_classes} if num_classes else {})}
    write_manifest(str(out / "train-manifest.parquet"), rows, meta)
    return str(out / "train-manifest.parquet")


def test_labels_the_model_has_no_class_for_fail_at_start(job, tmp_path):
    ten = _prepared(tmp_path, "ten", [[3] * 10, [2] * 10], 10)
    check_job(job(f"data.train_url={ten}"))  # 10 classes, model.num_classes = 10
    with pytest.raises(ConfigError, match=r"data.train_url=.*: labels go up to 9 \(.*train-manifest.parquet\) "
                                          r"but model.num_classes=5; set model.num_classes=10"):
        check_job(job(f"data.train_url={ten}", "model.num_classes=5"))
    with pytest.raises(ConfigError, match=r"the data set has 10 classes \(.*\) but model.num_classes=12; "
                                          r"set model.num_classes=10"):  # as certify: the class counts agree
        check_job(job(f"data.train_url={ten}", "model.num_classes=12"))
    undeclared = _prepared(tmp_path, "labels", [[1, 0, 0, 0, 0, 0, 0, 4]], None)  # labels up to 7
    with pytest.raises(ConfigError, match=r"labels go up to 7 .* model.num_classes=5; set model.num_classes=8"):
        check_job(job(f"data.train_url={undeclared}", "model.num_classes=5"))
    shard = tmp_path / "loose" / "train-000000.tar"  # no manifest: classes.json next to the shards decides
    shard.parent.mkdir()
    shard.write_bytes(b"\0" * 1024)
    (shard.parent / "classes.json").write_text(json.dumps({"num_classes": 100, "classes": []}))
    with pytest.raises(ConfigError, match=r"100 classes \(.*classes.json\) but model.num_classes=10"):
        check_job(job(f"data.train_url={shard}"))
