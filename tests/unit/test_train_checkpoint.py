"""Checkpoint format: manifest hashes, corruption detection, newest-valid discovery, (re-)partitioning."""

import json
import logging

import pytest
import torch

from lipnext_scale.ckpt import (
    CheckpointError, CheckpointManager, checkpoint_dir_name, consolidate_checkpoint, find_latest_valid,
    list_checkpoints, load_manifold_state, load_train_state, resolve_checkpoint, validate_checkpoint,
    write_rank_files,
)
from lipnext_scale.optim.partition import join_partitions, partition_of

SHAPES = {"a.weight": [3, 5], "b.bias": [7]}


def _fake_checkpoint(root, step: int, world: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a checkpoint as `world` ranks would; return the full tensors it holds."""
    g = torch.Generator().manual_seed(seed)
    full = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    moment = {n: torch.rand(s, generator=g) for n, s in SHAPES.items()}
    d = root / checkpoint_dir_name(step)
    for r in range(world):
        tensors = {f"fp32/{n}": partition_of(t, r, world) for n, t in full.items()}
        tensors.update({f"optim/exp_avg/{n}": partition_of(t, r, world) for n, t in moment.items()})
        tensors["rng/torch"] = torch.get_rng_state()
        # the manifold state of a.weight lives in its owner's (the last rank's) own file only
        manifold = {"exp_avg/a.weight": full["a.weight"] * 2, "slow/a.weight": full["a.weight"] * 3} \
            if r == world - 1 else {}
        meta = {"step": step, "world_size": world, "param_shapes": SHAPES, "optim_state_keys": ["exp_avg"],
                "manifold_owners": {"a.weight": world - 1}, "config": {"model": {"name": "x"}}} if r == 0 else None
        extra = {"optim_scalars": {"step": float(step)}, "manifold": {"step": step},
                 "data": {"batches_per_rank": step, "world_size": world}}
        write_rank_files(str(d), r, tensors, extra, meta, manifold=manifold)
    return {**full, **{f"m/{n}": t for n, t in moment.items()}}


@pytest.mark.parametrize("numel,world", [(15, 2), (7, 3), (4, 4), (3, 5)])
def test_partition_then_join_is_identity(numel, world):
    t = torch.arange(numel, dtype=torch.float32).reshape(-1)
    parts = [partition_of(t, r, world) for r in range(world)]
    assert len({p.numel() for p in parts}) == 1  # equal sizes, last padded with zeros
    assert torch.equal(join_partitions(parts, [numel]), t)


def test_consolidation_is_world_size_independent(tmp_path):
    full2 = _fake_checkpoint(tmp_path / "w2", 4, world=2)
    full3 = _fake_checkpoint(tmp_path / "w3", 4, world=3)
    s2 = load_train_state(str(tmp_path / "w2" / "step_00000004"))
    s3 = load_train_state(str(tmp_path / "w3" / "step_00000004"))
    for n in SHAPES:
        assert torch.equal(s2.params[n], full2[n]) and torch.equal(s3.params[n], full3[n])
        assert torch.equal(s2.optim["exp_avg"][n], full2[f"m/{n}"])
    for url, full in ((tmp_path / "w2" / "step_00000004", full2), (tmp_path / "w3" / "step_00000004", full3)):
        assert torch.equal(load_manifold_state(str(url), ["a.weight"])["a.weight"]["exp_avg"], full["a.weight"] * 2)
    assert s2.step == 4 and s2.world_size == 2 and s2.optim_scalars == {"step": 4.0}
    params, config = consolidate_checkpoint(str(tmp_path / "w3" / "step_00000004"))
    assert set(params) == set(SHAPES) and config == {"model": {"name": "x"}}


def test_truncated_file_is_detected_and_the_previous_checkpoint_is_used(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 2, world=2)
    _fake_checkpoint(tmp_path, 4, world=2, seed=1)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 4]
    victim = tmp_path / "step_00000004" / "rank-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="rank-00001.safetensors is corrupt"):
        validate_checkpoint(str(tmp_path / "step_00000004"))
    with caplog.at_level(logging.WARNING):
        assert find_latest_valid(str(tmp_path)) == f"{tmp_path}/step_00000002"
    assert "skipping checkpoint at step 4" in caplog.text


def test_missing_rank_manifest_makes_a_checkpoint_invisible(tmp_path):
    _fake_checkpoint(tmp_path, 2, world=2)
    _fake_checkpoint(tmp_path, 4, world=2)
    (tmp_path / "step_00000004" / "manifest-rank-00001.json").unlink()  # rank 1's upload never finished
    with pytest.raises(CheckpointError, match="incomplete"):
        validate_checkpoint(str(tmp_path / "step_00000004"))
    assert find_latest_valid(str(tmp_path)).endswith("step_00000002")


def test_tampered_meta_and_foreign_directories(tmp_path):
    _fake_checkpoint(tmp_path, 2, world=1)
    meta = tmp_path / "step_00000002" / "meta.json"
    meta.write_text(meta.read_text().replace('"step": 2', '"step": 3'))
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        validate_checkpoint(str(tmp_path / "step_00000002"))
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "step_12").mkdir()  # not our naming: ignored
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2]
    assert find_latest_valid(str(tmp_path)) is None
    assert find_latest_valid(str(tmp_path / "does-not-exist")) is None


def test_manifest_lists_sha256_of_every_file(tmp_path):
    _fake_checkpoint(tmp_path, 1, world=2)
    m0 = json.loads((tmp_path / "step_00000001" / "manifest-rank-00000.json").read_text())
    assert set(m0) == {"meta.json", "rank-00000.json", "rank-00000.safetensors", "manifold-rank-00000.safetensors"}
    m1 = json.loads((tmp_path / "step_00000001" / "manifest-rank-00001.json").read_text())
    assert set(m1) == {"rank-00001.json", "rank-00001.safetensors", "manifold-rank-00001.safetensors"}
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in m0.values())
    assert not list((tmp_path / "step_00000001").glob("*.tmp-*"))  # atomic writes left no temporaries


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3), (3, 2), (2, 2), (4, 5)])
def test_partitioned_load_gives_each_new_rank_exactly_its_zero3_slice(tmp_path, old_world, new_world):
    full = _fake_checkpoint(tmp_path, 3, world=old_world)
    url = str(tmp_path / "step_00000003")
    for rank in range(new_world):
        state = load_train_state(url, partition=(rank, new_world))
        for n in SHAPES:
            assert torch.equal(state.params[n], partition_of(full[n], rank, new_world)), (n, rank)
            assert torch.equal(state.optim["exp_avg"][n], partition_of(full[f"m/{n}"], rank, new_world))
        owned = load_manifold_state(url, ["a.weight"])  # from its old owner's file, whole, keyed by name
        assert set(owned) == {"a.weight"} and set(owned["a.weight"]) == {"exp_avg", "slow"}
        assert torch.equal(owned["a.weight"]["exp_avg"], full["a.weight"] * 2)
        assert torch.equal(owned["a.weight"]["slow"], full["a.weight"] * 3)
        assert load_manifold_state(url, []) == {}
        assert state.data["world_size"] == old_world and state.optim_scalars == {"step": 3.0}
        if old_world == new_world:
            assert set(state.rng) == {0, rank}  # only its own file (and rank 0's) was read


def test_manifold_state_file_is_hash_checked_and_names_are_validated(tmp_path):
    _fake_checkpoint(tmp_path, 4, world=2)
    url = str(tmp_path / "step_00000004")
    with pytest.raises(CheckpointError, match="no manifold optimizer state for"):
        load_manifold_state(url, ["nope.weight"])
    path = tmp_path / "step_00000004" / "manifold-rank-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="manifold-rank-00001.safetensors is corrupt"):
        load_manifold_state(url, ["a.weight"])


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("content", [b"\0" * 201, b"\x80\xff not utf-8", b"[1, 2]", b'{"rank-00000.json": 5}'],
                         ids=["zero-filled", "not-utf8", "not-an-object", "bad-entry"])
def test_unreadable_manifest_falls_back_to_the_previous_checkpoint(tmp_path, caplog, rank, content):
    _fake_checkpoint(tmp_path, 2, world=2)
    _fake_checkpoint(tmp_path, 4, world=2)
    (tmp_path / "step_00000004" / f"manifest-rank-{rank:05d}.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"manifest-rank-{rank:05d}.json.*corrupt"):
        validate_checkpoint(str(tmp_path / "step_00000004"))
    with caplog.at_level(logging.WARNING):
        assert find_latest_valid(str(tmp_path)) == f"{tmp_path}/step_00000002"
    assert "skipping checkpoint at step 4" in caplog.text


def test_a_newer_format_is_refused_in_one_line(tmp_path):
    d = tmp_path / "step_00000001"
    write_rank_files(str(d), 0, {}, {}, {"step": 1, "world_size": 1, "param_shapes": {}, "format_version": 3})
    with pytest.raises(CheckpointError, match="format version 3 is newer than this library supports"):
        validate_checkpoint(str(d))


def test_a_run_directory_resolves_to_its_newest_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path, 2, world=1)
    _fake_checkpoint(tmp_path, 4, world=1)
    assert resolve_checkpoint(str(tmp_path)) == f"{tmp_path}/step_00000004"
    assert resolve_checkpoint(f"{tmp_path}/step_00000002/") == f"{tmp_path}/step_00000002"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither an exported model .* nor a training checkpoint"):
        resolve_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))


def test_prune_keeps_the_newest_keep_last(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step, world=1)
    (tmp_path / "tensorboard").mkdir()
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    assert manager.prune() == [f"{tmp_path}/step_00000002", f"{tmp_path}/step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "step_00000008", "tensorboard"]
    assert manager.prune() == []
