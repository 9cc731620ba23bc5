"""`lipnext plan`'s memory arithmetic against closed forms (issue 11)."""

from __future__ import annotations

import math

import pytest

from lipnext_scale.config import OptimConfig
from lipnext_scale.model import get_spec
from lipnext_scale.plan import GIB, HEADROOM, ZeroSettings, format_plan, memory_plan, smallest_gpu_count


def test_one_gpu_holds_everything_once():
    spec = get_spec("lipnext-1b")
    plan = memory_plan("lipnext-1b", 1, 32)
    b = plan["bytes"]
    P = spec.num_params()
    assert b["parameters"] == 2 * P and b["fp32_masters"] == 4 * P and b["gradients"] == 4 * P
    assert b["euclidean_state"] == 8 * P
    matrices = spec.stem_in * spec.width + 2 * spec.depth * spec.width ** 2
    # Adam moments + Lookahead slow copy on every matrix, + the update sum on square ones (all but the stem)
    assert b["manifold_state"] == 4 * (3 * matrices + 2 * spec.depth * spec.width ** 2 + (spec.width ** 2 if
                                                                                             spec.stem_in == spec.width else 0))
    assert plan["global_batch"] == 32


def test_partitions_shrink_with_gpus_and_activations_do_not():
    one, eight = memory_plan("lipnext-2b", 1, 16), memory_plan("lipnext-2b", 8, 16)
    for kind in ("parameters", "fp32_masters", "gradients", "euclidean_state"):
        assert eight["bytes"][kind] == pytest.approx(one["bytes"][kind] / 8, rel=1e-4)
    assert eight["bytes"]["activations"] == one["bytes"]["activations"]
    # 128 equal matrices over 8 owners: each owns 16, so the largest share is exactly 1/8
    assert eight["bytes"]["manifold_state"] == pytest.approx(one["bytes"]["manifold_state"] / 8, rel=0.02)
    assert eight["global_batch"] == 128


def test_fp32_has_no_masters_and_four_byte_parameters():
    b = memory_plan("lipnext-tiny", 2, 8, zero=ZeroSettings(precision="fp32"))["bytes"]
    assert b["fp32_masters"] == 0 and b["parameters"] == 2 * b["gradients"] / 2


def test_manifold_state_follows_the_optimizer_config():
    lean = OptimConfig(lookahead_k=0, moments="momentum")
    b = memory_plan("lipnext-1b", 1, 8, optim_cfg=lean)["bytes"]
    spec = get_spec("lipnext-1b")
    assert b["manifold_state"] == 4 * (spec.stem_in * spec.width + 2 * spec.depth * spec.width ** 2)


def test_smallest_gpu_count_is_the_first_that_fits():
    n = smallest_gpu_count("lipnext-2b", 80, 32)
    assert n is not None and n > 1
    limit = 80 * GIB * HEADROOM
    assert memory_plan("lipnext-2b", n, 32)["total_bytes"] <= limit
    assert memory_plan("lipnext-2b", n - 1, 32)["total_bytes"] > limit
    assert smallest_gpu_count("lipnext-2b", 1, 32) is None  # 1 GiB never holds its activations
    assert "total per GPU" in format_plan(memory_plan("lipnext-1b", 8, 32), 80)


def test_the_manifold_step_holds_the_owners_round_its_neighbours_in_flight_and_the_update_workspace():
    from lipnext_scale.plan import MANIFOLD_UPDATE_WORKSPACE, _manifold_step_peaks

    n = 1000
    eight = {f"m{i}": (10, 100) for i in range(8)}
    owners = {f"m{i}": i % 2 for i in range(8)}  # 4 each; rounds of 2 matrices (R = 2n): 2 rounds
    # round 0: its matrices + grads (2R), round 1's receives (2R) and sends (half of both owners' 4R: 2R)
    assert _manifold_step_peaks(eight, owners, 2, 2 * n) == [(6 * 2 * n, 2 * n)] * 2
    three = {f"m{i}": (10, 100) for i in range(3)}  # one rank, rounds of one matrix: the middle one holds most
    assert _manifold_step_peaks(three, {k: 0 for k in three}, 1, n) == [(2 * n + 4 * n + 2 * n, n)]
    C = get_spec("lipnext-2b").width
    b = memory_plan("lipnext-2b", 8, 16)["bytes"]  # 256 MiB rounds: 4 of the 4096 x 4096 fp32 matrices
    assert b["manifold_update"] == int(4 * MANIFOLD_UPDATE_WORKSPACE * 4 * C * C)
    small = memory_plan("lipnext-2b", 8, 16, optim_cfg=OptimConfig(manifold_bucket_mb=1))["bytes"]
    assert small["manifold_update"] == int(4 * MANIFOLD_UPDATE_WORKSPACE * C * C)  # at least a whole matrix


def test_reduce_bucket_and_euclidean_lookahead_copy():
    from lipnext_scale.plan import ZeroSettings

    spec = get_spec("lipnext-1b")
    plain = memory_plan("lipnext-1b", 1, 8, zero=ZeroSettings(reduce_bucket_size=10 ** 8))["bytes"]
    assert plain["reduce_bucket"] == 2 * 10 ** 8 and plain["euclidean_state"] == 8 * spec.num_params()
    ahead = memory_plan("lipnext-1b", 1, 8, optim_cfg=OptimConfig(euclid_lookahead_k=5))["bytes"]
    assert ahead["euclidean_state"] == 12 * spec.num_params()


def test_the_peak_is_what_persists_plus_the_larger_phase():
    for gpus, micro in ((1, 1), (8, 64), (64, 16)):
        plan = memory_plan("lipnext-2b", gpus, micro)
        b, phases = plan["bytes"], plan["phases"]
        assert phases == {"forward_backward": b["live_parameters"] + b["activations"],
                          "manifold_step": b["manifold_gather"] + b["manifold_update"]}
        persistent = sum(b[k] for k in ("parameters", "fp32_masters", "gradients", "reduce_bucket",
                                        "euclidean_state", "manifold_state", "runtime"))
        assert plan["total_bytes"] == persistent + max(phases.values())
    assert memory_plan("lipnext-2b", 8, 64)["phases"]["forward_backward"] > \
        memory_plan("lipnext-2b", 8, 64)["phases"]["manifold_step"]  # big micro-batches: activations win


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="gpus=0"):
        memory_plan("lipnext-tiny", 0, 8)
    assert math.isfinite(memory_plan("lipnext-tiny", 3, 1)["total_bytes"])


# ------------------------------------------------------------------ `lipnext plan` (the CLI)


def test_plan_cli_prints_the_breakdown_owners_global_batch_and_smallest_fit(capsys):
    from lipnext_scale.cli import main

    assert main(["plan", "lipnext-2b", "--gpus", "16", "--gpu-mem", "80", "--micro-batch", "16",
                 "--grad-accum", "2"]) == 0
    out = capsys.readouterr().out
    plan = memory_plan("lipnext-2b", 16, 16, grad_accum=2)
    assert f"{plan['total_bytes'] / GIB:8.2f} GiB" in out
    assert "manifold state by owner (GiB): rank 0" in out and "ranks 8-15" in out
    assert "global batch      512 = 16 GPUs x micro-batch 16 x 2 accumulation steps" in out
    assert f"smallest fit      {smallest_gpu_count('lipnext-2b', 80, 16)} GPU(s) of 80 GiB" in out


@pytest.mark.parametrize("argv,message", [
    (["nope", "--gpus", "2", "--gpu-mem", "80", "--micro-batch", "1"], "unknown model 'nope'; choose one of"),
    (["lipnext-2b", "--gpus", "0", "--gpu-mem", "80", "--micro-batch", "1"], "--gpus 0: counts must be >= 1"),
    (["lipnext-2b", "--gpus", "2", "--gpu-mem", "-1", "--micro-batch", "1"], "--gpu-mem -1.0"),
    (["lipnext-2b", "--gpus", "2", "--gpu-mem", "inf", "--micro-batch", "1"], "--gpu-mem inf"),
    (["lipnext-2b", "--gpus", "2", "--gpu-mem", "80", "--micro-batch", "0"], "--micro-batch 0"),
    (["lipnext-1b", "--gpus", "2", "--gpu-mem", "24", "--micro-batch", "1", "--depth", "0"], "--depth 0"),
])
def test_plan_cli_bad_values_are_one_line_errors(capsys, argv, message):
    from lipnext_scale.cli import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lipnext plan: error: ") and message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------ the global batch at every world size


def _train(**kw):
    from lipnext_scale.config import TrainConfig

    tc = TrainConfig(**kw)
    tc.validate()
    return tc


@pytest.mark.parametrize("value,expected", [(3, (3, 3)), ("2-4", (2, 4)), (" 1 - 2 ", (1, 2)), ([2, 4], (2, 4)),
                                            ("3", (3, 3))])
def test_num_workers_is_a_count_or_a_range(value, expected):
    tc = _train(num_workers=value, global_batch=24)
    assert tc.worker_range == expected and tc.elastic == (expected[0] < expected[1])


@pytest.mark.parametrize("overrides,message", [
    (["train.num_workers=4-2"], "need 1 <= fewest <= most workers"),
    (["train.num_workers=0"], "need 1 <= fewest <= most workers"),
    (["train.num_workers=[1, 2, 3]"], "use a count such as 4 or a range"),
    (["train.num_workers=two"], "use a count such as 4 or a range"),
    (["train.num_workers=2-4", "train.global_batch=18"], "train.global_batch=18 does not split evenly over 4 "
                                                         "workers (train.num_workers='2-4'); set train.global_batch to "
                                                         "a multiple of 12, e.g. --set train.global_batch=12"),
    (["train.global_batch=-1"], "need global_batch >= 0"),
])
def test_bad_worker_ranges_and_global_batches_are_one_line_config_errors(overrides, message):
    from lipnext_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_default_global_batch_is_checked_against_every_size_at_job_start():
    from lipnext_scale.config import ConfigError, load_config

    cfg = load_config(None, ["train.num_workers=3-4", "data.batch_size=1"])  # 1 x 1 x 4 = 4: not by 3
    with pytest.raises(ConfigError, match=r"the global batch 4 \(data.batch_size=1 x train.grad_accum=1 x 4 "
                                          r"workers\) does not split evenly over 3 workers"):
        cfg.train.check_global_batch(cfg.data.batch_size)


def test_batch_split_keeps_the_global_batch_with_the_fewest_accumulation_steps():
    tc = _train(num_workers=[1, 4], global_batch=48)
    for world in (1, 2, 3, 4):
        micro, accum = tc.batch_split(world, max_micro_batch=8)
        assert micro * accum * world == 48 and micro <= 8
        # brute force: no split with fewer accumulation steps fits the micro-batch bound
        assert not [a for a in range(1, accum) if (48 // world) % a == 0 and 48 // world // a <= 8]
    assert tc.batch_split(1, 8) == (8, 6) and tc.batch_split(4, 8) == (6, 2)
    # the default: data.batch_size x grad_accum x the most workers, so a fixed-size job is what it always was
    fixed = _train(num_workers=2, grad_accum=3)
    assert fixed.global_batch_for(16) == 96 and fixed.batch_split(2, 16) == (16, 3)
    assert _train(num_workers=[1, 2]).batch_split(1, 8) == (8, 2)  # half the workers: twice the accumulation


def test_plan_for_world_is_the_split_with_the_global_batch_and_leaves_the_config_alone():
    from dataclasses import replace

    from lipnext_scale.config import load_config
    from lipnext_scale.train.resume import plan_for_world, restart_scalars
    from lipnext_scale.train.resume import Position

    cfg = load_config(None, ["train.num_workers=1-2", "data.batch_size=8"])
    one = plan_for_world(cfg, 1)
    assert (one.micro, one.accumulation, one.global_batch) == (8, 2, 16)
    assert cfg.data.batch_size == 8 and cfg.train.global_batch == 0  # the job's config is not changed
    # a config stored by an older version (checkpoints stored the split at their size) re-splits the same way
    stored = replace(cfg, data=replace(cfg.data, batch_size=8), train=replace(cfg.train, grad_accum=2, global_batch=16))
    assert plan_for_world(stored, 2).accumulation == 1
    scalars = restart_scalars(Position(10, 20, "ckpt", 2, plan=one), 1)
    assert scalars == {"run/world_size": 1, "run/resumed": 1.0, "run/checkpoint_world_size": 2, "run/micro_batch": 8,
                       "run/grad_accum": 2, "run/global_batch": 16}
