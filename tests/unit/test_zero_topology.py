"""DeepSpeed configs for one node and many (issue 14): ZeRO++ hierarchical partitioning resolved from the
cluster's shape, buckets that hold whole blocks, the choice recorded in the engine config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lipnext_scale.config import ConfigError, load_config
from lipnext_scale.model import get_spec
from lipnext_scale.train.engine import deepspeed_config, hpz_partition_size

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def _ds(name: str, world: int, per_node: int | None):
    cfg = load_config(None, [f'train.deepspeed="configs/deepspeed/{name}"'])
    nodes = None if per_node is None else [r // per_node for r in range(world)]
    return deepspeed_config(json.loads((CONFIGS / name).read_text()), cfg.train, cfg.batch_plan(world), cfg.optim,
                            world, nodes)["zero_optimization"]


def test_hpz_is_the_node_size_on_many_nodes_and_off_on_one():
    assert _ds("zero3_bf16_multinode.json", 32, 8)["zero_hpz_partition_size"] == 8
    assert _ds("zero3_bf16_multinode.json", 8, 8)["zero_hpz_partition_size"] == 1  # one node: nothing to gain
    assert _ds("zero3_bf16_multinode.json", 2, None)["zero_hpz_partition_size"] == 1
    assert "zero_hpz_partition_size" not in _ds("zero3_bf16.json", 32, 8)


@pytest.mark.parametrize("setting", [0, -2, "all", True, 2.0])
def test_bad_hpz_settings_are_named(setting):
    with pytest.raises(ConfigError, match="positive integer"):
        hpz_partition_size(setting, [r // 8 for r in range(32)], "x.json")
    assert hpz_partition_size(4, [r // 8 for r in range(32)], "x.json").size == 4


@pytest.mark.parametrize("name", ["zero3_bf16.json", "zero3_bf16_multinode.json",
                                  "zero3_bf16_multinode_quantized.json"])
def test_buckets_hold_a_whole_block_of_the_largest_models(name):
    zero = json.loads((CONFIGS / name).read_text())["zero_optimization"]
    block = 2 * get_spec("lipnext-2b").width ** 2  # R and M of one block, elements
    assert zero["reduce_bucket_size"] >= block and zero["stage3_prefetch_bucket_size"] >= block
    assert zero["stage3_param_persistence_threshold"] == 0  # small matrices are sharded too (manifold step)


def test_quantized_variant_differs_only_in_quantization():
    plain = json.loads((CONFIGS / "zero3_bf16_multinode.json").read_text())
    quant = json.loads((CONFIGS / "zero3_bf16_multinode_quantized.json").read_text())
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        assert plain["zero_optimization"].pop(key) is False and quant["zero_optimization"].pop(key) is True
    assert plain == quant


def test_the_launcher_picks_the_config_from_the_cluster_shape():
    from lipnext_scale.train.cli import DEEPSPEED_MANY_NODES, DEEPSPEED_ONE_NODE, deepspeed_for_cluster

    assert deepspeed_for_cluster([8]) == DEEPSPEED_ONE_NODE
    assert deepspeed_for_cluster([0, 8]) == DEEPSPEED_ONE_NODE  # a CPU-only head does not count
    assert deepspeed_for_cluster([8, 8, 8, 8]) == DEEPSPEED_MANY_NODES
    for path in (DEEPSPEED_ONE_NODE, DEEPSPEED_MANY_NODES):
        assert (CONFIGS.parent.parent / path).is_file()


def test_the_launcher_counts_nodes_that_can_host_a_worker_cpu_workers_included():
    """A CPU cluster of several nodes gets the multi-node config too (it once counted GPUs only, so CPU
    clusters, the rehearsal's included, always got the one-node config)."""
    from types import SimpleNamespace

    from lipnext_scale.train.cli import DEEPSPEED_MANY_NODES, DEEPSPEED_ONE_NODE, deepspeed_for_cluster, worker_slots
    from lipnext_scale.train.trainer import worker_resources

    head, cpu_node = {"CPU": 0.0, "memory": 1e9}, {"CPU": 2.0, "memory": 1e9}
    gpu_node = {"CPU": 96.0, "GPU": 8.0}
    cpu_worker = worker_resources(SimpleNamespace(cpus_per_worker=1), use_gpu=False)
    gpu_worker = worker_resources(SimpleNamespace(cpus_per_worker=4), use_gpu=True)
    assert cpu_worker == {"CPU": 1} and gpu_worker == {"CPU": 4, "GPU": 1}
    assert worker_slots([head, cpu_node, cpu_node], cpu_worker) == [0, 2, 2]
    assert deepspeed_for_cluster(worker_slots([head, cpu_node, cpu_node], cpu_worker)) == DEEPSPEED_MANY_NODES
    assert deepspeed_for_cluster(worker_slots([head, cpu_node], cpu_worker)) == DEEPSPEED_ONE_NODE
    # GPU workers: a CPU head with many CPUs hosts none; a node's CPUs can limit its GPU workers
    assert worker_slots([{"CPU": 64.0}, gpu_node, {"CPU": 8.0, "GPU": 8.0}], gpu_worker) == [0, 8, 2]
    assert deepspeed_for_cluster(worker_slots([{"CPU": 64.0}, gpu_node], gpu_worker)) == DEEPSPEED_ONE_NODE


def _nodes(*sizes: int) -> list[int]:
    return [n for n, size in enumerate(sizes) for _ in range(size)]


@pytest.mark.parametrize("sizes,want", [
    ((8, 8, 8, 8), 8), ((8,), 1), ((8, 8, 4), 4), ((6, 4), 2), ((5, 3), 1), ((4, 4, 3, 1), 1),
])
def test_hpz_auto_is_a_group_size_that_never_straddles_nodes(sizes, want):
    choice = hpz_partition_size("auto", _nodes(*sizes), "x.json")
    assert choice.size == want, choice.reason
    world, bounds = sum(sizes), {sum(sizes[:i]) for i in range(len(sizes) + 1)}
    assert world % choice.size == 0
    if choice.size > 1:  # every group of consecutive ranks lies inside one node
        assert all(b % choice.size == 0 for b in bounds)
    if len(set(sizes)) > 1 and want > 1:
        assert "uneven" in choice.reason


def test_hpz_is_off_when_a_node_s_ranks_are_not_consecutive():
    choice = hpz_partition_size("auto", [0, 1, 0, 1], "x.json")
    assert choice.size == 1 and "not consecutive" in choice.reason


def test_an_integer_hpz_that_no_longer_fits_falls_back_to_auto_and_says_so():
    assert hpz_partition_size(4, _nodes(8, 8), "x.json").size == 4
    choice = hpz_partition_size(8, _nodes(8, 4), "x.json")  # a node lost half its GPUs
    assert choice.size == 4 and "does not divide" in choice.reason


@pytest.mark.parametrize("workers", ['"2-4"', "[2, 4]"])
def test_elastic_ranges_with_the_multinode_config_pass_preflight(workers):
    """The documented elastic launch picks the multi-node config; preflight builds the engine config of every
    size in the range (it once handed the string "2-4" to the hpZ sizing as the world size)."""
    from lipnext_scale.train.preflight import check_engine_configs

    name = "zero3_bf16_multinode.json"
    cfg = load_config(None, [f'train.deepspeed="configs/deepspeed/{name}"', f"train.num_workers={workers}",
                             "train.global_batch=48", "data.batch_size=8"])
    check_engine_configs(cfg, json.loads((CONFIGS / name).read_text()))
    bad = load_config(None, [f'train.deepspeed="configs/deepspeed/{name}"', f"train.num_workers={workers}",
                             "train.global_batch=48", "data.batch_size=8"])
    base = json.loads((CONFIGS / name).read_text())
    base["zero_optimization"]["zero_hpz_partition_size"] = "node"
    with pytest.raises(ConfigError, match="zero_hpz_partition_size='node'"):
        check_engine_configs(bad, base)


def test_a_range_whose_sizes_do_not_all_divide_the_global_batch_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="does not split evenly over 9 workers.*narrower range or a fixed count"):
        load_config(None, ['train.num_workers="8-16"', "train.global_batch=1024"])
