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
    return deepspeed_config(json.loads((CONFIGS / name).read_text()), cfg.train, cfg.data, cfg.optim, world,
                            ranks_per_node=per_node)["zero_optimization"]


def test_hpz_is_the_node_size_on_many_nodes_and_off_on_one():
    assert _ds("zero3_bf16_multinode.json", 32, 8)["zero_hpz_partition_size"] == 8
    assert _ds("zero3_bf16_multinode.json", 8, 8)["zero_hpz_partition_size"] == 1  # one node: nothing to gain
    assert _ds("zero3_bf16_multinode.json", 2, None)["zero_hpz_partition_size"] == 1
    assert "zero_hpz_partition_size" not in _ds("zero3_bf16.json", 32, 8)


@pytest.mark.parametrize("setting,world,node,match", [
    (3, 32, 8, "does not divide"), (0, 32, 8, "positive integer"), ("all", 32, 8, "positive integer"),
])
def test_bad_hpz_settings_are_named(setting, world, node, match):
    with pytest.raises(ConfigError, match=match):
        hpz_partition_size(setting, world, node, "x.json")
    assert hpz_partition_size(4, 32, 8, "x.json") == 4


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
