"""`lipnext plan`'s memory arithmetic against closed forms (issue 11)."""

from __future__ import annotations

import math

import pytest

from lipnext_scale.config import OptimConfig
from lipnext_scale.model import get_spec
from lipnext_scale.plan import GIB, HEADROOM, format_plan, memory_plan, smallest_gpu_count


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
    b = memory_plan("lipnext-tiny", 2, 8, precision="fp32")["bytes"]
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


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="gpus=0"):
        memory_plan("lipnext-tiny", 0, 8)
    assert math.isfinite(memory_plan("lipnext-tiny", 3, 1)["total_bytes"])
