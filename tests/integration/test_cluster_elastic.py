"""Multi-node and elastic training on a simulated Ray cluster (`ray.cluster_utils.Cluster`: one head with no
CPUs + two 1-CPU worker nodes, each its own raylet), with real Ray Train, DeepSpeed ZeRO-3 (gloo, fp32, CPU)
and real digits shards. One cluster serves the module, in this order:

  r1       `ray job submit -- python launchers/train_2b.py --set model.name=lipnext-tiny ...`: the 2B launcher,
           shrunk by flags only, trains on 2 workers that land on different nodes (the uninterrupted reference)
  elastic  train.num_workers=[1, 2]: a node is killed mid-run -> the run restarts at 1 worker from its last
           checkpoint; a node is added -> Ray Train resizes back to 2; it finishes with every checkpoint whole
  planned  the same world-size schedule as planned, uninterrupted runs (r1, then 1 worker from r1's checkpoint,
           then 2 workers): bit-identical weights and optimizer state at every resize and at the end
  certify  `ray job submit -- python launchers/certify.py ... --actors 2`: actors on different nodes, results
           identical to certifying in one process
  preempt  a node drained for preemption (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`): the workers
           checkpoint on the notice; the node is then removed and the run continues on the other from there

Ray 2.60's autoscaling coordinator, which Ray Train's elastic policy asks for the workers it could run, re-reads
the cluster every 20 s. The test asks it to re-read right after it adds or removes a node (its public
`get_reserved_resources(recompute=True)`), so resizes happen within seconds instead of within 20 s.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lipnext_scale.ckpt import CheckpointError, list_checkpoints, load_manifold_state, load_train_state
from lipnext_scale.ckpt import validate_checkpoint
from lipnext_scale.model import orthogonality_error

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
STEPS, EVERY = 60, 5
# The preemption run: from r1's step 10, log (and ask for a notice) every 2 steps. Long enough that the notice
# (16-20 s measured from `ray drain-node` to the checkpoint it asks for) always arrives before the run ends:
# with 40 steps a fast run once finished first.
PREEMPT_STEPS = 120
# The 2B recipe (configs/train/imagenet_2b.toml) shrunk by flags only: what every run of this module trains.
SHRINK = [
    "model.name=lipnext-tiny", "model.width=16", "model.depth=1", "model.num_classes=10", "model.image_size=32",
    "data.dataset=digits", "data.batch_size=8", "data.loader_processes=0", "data.shuffle_buffer=64",
    "train.precision=fp32", "train.deepspeed=configs/deepspeed/zero3_fp32.json", "train.use_gpu=false",
    "train.deterministic_data=true", "train.progress_bar=false", "train.log_every=5", "train.eval_batches=1",
    "train.eval_every=0", f"train.steps={STEPS}", "train.max_failures=3", "optim.warmup_steps=2",
    "train.global_batch=16",  # the same at every world size and in every run (1-worker runs: 2 x 8)
    f"ckpt.every_steps={EVERY}", "ckpt.keep_last=1000",
    "certify.during_training=false",  # certification of checkpoints during training has its own tests
]
# Process environment of the cluster (its raylets inherit it, and so do the Ray Train controller and workers).
CLUSTER_ENV = {
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",  # default 5 s: how often Ray Train looks for node drains
    # A restart right after a node loss may still count the lost node (the coordinator's view is up to one
    # tick old) and wait for its workers until this timeout (default 60 s) before retrying at the size left.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
}
TIMES: dict[str, float] = {}  # measured seconds, printed at the end of the module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the session's local Ray instance; the next module that needs it starts it again
    saved = {k: os.environ.get(k) for k in CLUSTER_ENV}
    os.environ.update(CLUSTER_ENV)
    started = time.monotonic()
    port = _free_port()
    # Every node's dashboard agent gets its own free port: on one machine they would all take the default
    # 52365 (and collide with any other Ray instance here), and the Jobs API needs the head's agent.
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
        "dashboard_agent_listen_port": _free_port(),
        # notice a killed node within ~2 s (default: ~30 s of missed health checks)
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    c.dashboard_url = f"http://127.0.0.1:{port}"
    c.first_nodes = [_add_node(c), _add_node(c)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    TIMES["cluster_start_s"] = time.monotonic() - started
    yield c
    ray.shutdown()
    c.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    print("\ncluster timings:", json.dumps({k: round(v, 1) for k, v in TIMES.items()}))


@pytest.fixture(scope="module")
def digits(cluster, digits_shards):
    return digits_shards(100)  # 15 train / 3 val shards: enough for two certification actors


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster-runs")


# ---------------------------------------------------------------------------------------------- helpers


def _add_node(cluster):
    return cluster.add_node(num_cpus=1, dashboard_agent_listen_port=_free_port())


def _refresh_worker_count(cluster) -> None:
    """Make Ray Train's elastic policy see the cluster as it is now (the coordinator's next tick, now)."""
    import ray

    cluster.wait_for_nodes()
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("lipnext-test", recompute=True))


def _actors(class_name: str, alive_only: bool = False) -> list:
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name)] + ([("state", "=", "ALIVE")] if alive_only else [])
    return list_actors(filters=filters, limit=1000, raise_on_missing_output=False)


def _wait(predicate, what: str, timeout: float = 300, thread: "Background | None" = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if thread is not None and not thread.is_alive():
            raise AssertionError(f"the run ended before {what}: {thread.error or thread.result}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _valid(url: str) -> bool:
    try:
        validate_checkpoint(url)
        return True
    except CheckpointError:
        return False


def _valid_steps(run: Path) -> dict[int, int]:
    """step -> world size of the run's valid checkpoints (one being set aside right now is skipped)."""
    out = {}
    for step, url in list_checkpoints(str(run)):
        try:
            out[step] = validate_checkpoint(url)["world_size"]
        except (CheckpointError, OSError):
            continue
    return out


class Background(threading.Thread):
    """`run_training` in a thread of this process (the driver), so the main thread can add and remove nodes
    (a raylet can only be started from the main thread)."""

    def __init__(self, cfg):
        super().__init__(daemon=True)
        self.cfg, self.result, self.error = cfg, None, None

    def run(self):
        from lipnext_scale.train.trainer import run_training

        try:
            self.result = run_training(self.cfg)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            self.error = e


def _config(storage: Path, digits: Path, name: str, *extra: str):
    from lipnext_scale.train.cli import build_train_config, dataset_overrides

    return build_train_config("configs/train/imagenet_2b.toml", [
        *dataset_overrides(str(digits)), *SHRINK, f'train.storage="{storage}"', f"train.name={name}", *extra])


def _ray_job(cluster, args: list[str], timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for _ in range(60):  # the head's job agent registers a few seconds after the dashboard answers
        done = subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard_url, "--", *args], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        if "No available agent to submit job" not in output:
            break
        time.sleep(1)
    assert done.returncode == 0 and "succeeded" in output, output[-4000:]
    return output


def _same_state(a_url: str, b_url: str) -> None:
    """Weights, AdamW state and manifold optimizer state identical (checkpoints of any world sizes)."""
    a, b = load_train_state(a_url), load_train_state(b_url)
    assert a.step == b.step
    names = sorted(a.meta["manifold_owners"])
    manifold = [{f"{k}/{n}": v for n, e in load_manifold_state(u, names).items() for k, v in e.items()}
                for u in (a_url, b_url)]
    assert manifold[0] and a.optim
    for what, x, y in [("weights", a.params, b.params), ("manifold optimizer state", *manifold),
                       *[(f"optimizer {k}", a.optim[k], b.optim[k]) for k in a.optim]]:
        assert x.keys() == y.keys(), what
        diff = {n: float((x[n] - y[n]).abs().max()) for n in x if not torch.equal(x[n], y[n])}
        assert not diff, f"{what} differ between {a_url} and {b_url}: {diff}"
    assert a.optim_scalars == b.optim_scalars and a.manifold_extra == b.manifold_extra


def _starts(run: Path) -> list[tuple[int, int, float]]:
    """(step, world size, wall time) of every (re)start, from the run's TensorBoard scalars (`run/world_size`
    is written when a start has built its engine and resumed, just before its first step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return sorted((e.step, int(e.value), e.wall_time) for e in acc.Scalars("run/world_size"))


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def r1(cluster, digits, storage):
    """The 2B launcher through `ray job submit`, shrunk by flags: 2 workers, uninterrupted."""
    started = time.monotonic()
    args = ["python", str(REPO / "launchers" / "train_2b.py"), "--data", str(digits), "--storage", str(storage),
            "--num-workers", "2"]
    for item in [*SHRINK, "train.name=r1"]:
        args += ["--set", item]
    output = _ray_job(cluster, args, timeout=600)
    TIMES["r1_job_s"] = time.monotonic() - started
    return output


def test_launcher_job_trains_on_workers_on_different_nodes(r1, storage):
    assert "training finished: r1" in r1
    run = storage / "r1"
    assert _valid_steps(run) == {s: 2 for s in range(EVERY, STEPS + 1, EVERY)}
    workers = _actors("RayTrainWorker")
    assert len(workers) == 2, workers
    assert len({w.node_id for w in workers}) == 2, "the two workers share a node"


@pytest.fixture(scope="module")
def elastic(r1, cluster, digits, storage):
    """2 workers -> a node dies -> 1 worker -> a node joins -> 2 workers, on train.num_workers=[1, 2]."""
    run = storage / "elastic"
    job = Background(_config(storage, digits, "elastic", "train.num_workers=[1, 2]", "train.resize_check_s=1"))
    job.start()
    first = _wait(lambda: [s for s in _valid_steps(run) if s >= 10], "the first checkpoints", thread=job)
    victim = next(n for n in cluster.first_nodes if n.node_id in {w.node_id for w in _actors("RayTrainWorker", True)})
    lost_at, TIMES["node_lost_wall"] = time.monotonic(), time.time()
    cluster.remove_node(victim, allow_graceful=False)  # the raylet and its workers are killed: a node loss
    _refresh_worker_count(cluster)
    small = _wait(lambda: [s for s, w in _valid_steps(run).items() if w == 1], "a checkpoint at 1 worker",
                  thread=job)
    TIMES["node_loss_to_first_checkpoint_at_1_worker_s"] = time.monotonic() - lost_at
    joined_at, TIMES["node_joined_wall"] = time.monotonic(), time.time()
    _add_node(cluster)
    _refresh_worker_count(cluster)
    _wait(lambda: [s for s, w in _valid_steps(run).items() if w == 2 and s > min(small)],
          "a checkpoint at 2 workers again", thread=job)
    TIMES["node_join_to_first_checkpoint_at_2_workers_s"] = time.monotonic() - joined_at
    job.join(timeout=600)
    assert job.error is None, job.error
    TIMES["elastic_run_s"] = time.monotonic() - lost_at
    print(f"elastic run: first checkpoints {first}, killed node {victim.node_id[:8]}")
    return job.result


def test_elastic_run_shrinks_on_node_loss_grows_back_and_finishes(elastic, storage):
    run = storage / "elastic"
    assert elastic["metrics"]["step"] == STEPS and elastic["metrics"]["final"] is True
    starts = _starts(run)
    assert [w for _, w, _ in starts] == [2, 1, 2], starts  # the starts: 2 workers, 1 after the loss, 2 again
    _, (shrunk_at, _, shrunk_wall), (grown_at, _, grown_wall) = starts
    TIMES.update(resized_to_1_at_step=shrunk_at, resized_to_2_at_step=grown_at,
                 node_loss_to_restart_at_1_worker_s=shrunk_wall - TIMES.pop("node_lost_wall"),
                 node_join_to_restart_at_2_workers_s=grown_wall - TIMES.pop("node_joined_wall"))
    # No checkpoint lost: every one of the schedule is there and whole, each written at the size of its segment.
    written = _valid_steps(run)
    assert sorted(written) == list(range(EVERY, STEPS + 1, EVERY))
    assert written == {s: 2 if s <= shrunk_at or s > grown_at else 1 for s in written}
    assert [url for _, url in list_checkpoints(str(run)) if not _valid(url)] == []
    for aside in run.glob("superseded-*/step_*"):  # set aside by a restart: only ever unfinished ones
        assert not _valid(str(aside)), f"{aside} is a complete checkpoint but was set aside"
    # Samples seen follow the schedule: at every size the split makes the configured global batch, and the
    # data position is step x accumulation (each restart enters its streams at the resumed step).
    for step, url in list_checkpoints(str(run)):
        state = load_train_state(url)
        tc, world = state.config["train"], state.world_size
        assert state.config["data"]["batch_size"] * tc["grad_accum"] * world == tc["global_batch"] == 16
        assert state.data["batches_per_rank"] == step * tc["grad_accum"]
    final = load_train_state(str(run / f"step_{STEPS:08d}"))
    for name, w in final.params.items():
        if name.endswith(("stem.weight", ".rot", ".mix")):
            assert orthogonality_error(w) < 1e-4, name


def test_planned_runs_with_the_same_world_size_schedule_give_identical_weights(elastic, r1, digits, storage):
    """r1 (2 workers, uninterrupted) -> r2 (1 worker from r1's checkpoint where the elastic run shrank) -> r3
    (2 workers from r2's checkpoint where it grew back): every resume point and the final state are identical."""
    from lipnext_scale.train.trainer import run_training

    _, (shrunk_at, _, _), (grown_at, _, _) = _starts(storage / "elastic")
    started = time.monotonic()
    run_training(_config(storage, digits, "r2", "train.num_workers=1", f'train.resume="{storage}/r1/step_{shrunk_at:08d}"'))
    r3 = run_training(_config(storage, digits, "r3", "train.num_workers=2",
                              f'train.resume="{storage}/r2/step_{grown_at:08d}"'))
    TIMES["planned_runs_s"] = time.monotonic() - started
    _same_state(f"{storage}/r1/step_{shrunk_at:08d}", f"{storage}/elastic/step_{shrunk_at:08d}")
    _same_state(f"{storage}/r2/step_{grown_at:08d}", f"{storage}/elastic/step_{grown_at:08d}")
    _same_state(r3["checkpoint"], f"{storage}/elastic/step_{STEPS:08d}")


def test_certify_job_actors_on_two_nodes_match_one_process(elastic, cluster, digits, tmp_path):
    import pyarrow.parquet as pq

    from lipnext_scale.certify.job import certify_job

    ckpt = elastic["checkpoint"]
    started = time.monotonic()
    _ray_job(cluster, ["python", str(REPO / "launchers" / "certify.py"), ckpt, "--data", f"{digits}/val",
                       "--out", str(tmp_path / "cluster"), "--actors", "2", "--no-progress"], timeout=600)
    TIMES["certify_job_s"] = time.monotonic() - started
    actors = _actors("ShardCertifier")
    assert len(actors) == 2 and len({a.node_id for a in actors}) == 2, actors
    one = certify_job(ckpt, f"{digits}/val", str(tmp_path / "local"), actors=0, progress=False)
    on_cluster = json.loads((tmp_path / "cluster" / "report.json").read_text())
    assert pq.read_table(tmp_path / "cluster" / "samples.parquet").equals(pq.read_table(tmp_path / "local" / "samples.parquet"))
    for key in one:
        if key != "timing":
            assert on_cluster[key] == json.loads(json.dumps(one[key])), key


def test_preemption_notice_checkpoints_and_the_run_continues_on_another_node(elastic, r1, cluster, digits, storage):
    """Workers told their node is being preempted (Ray's drain notice) checkpoint at once; when the node is gone
    the run restarts on the node left, resumes from that checkpoint and finishes."""
    run = storage / "preempt"
    # Starts from r1's step 10 (copied into this run at once); no periodic checkpoints, so the only other
    # checkpoint before the end is the one the notice asks for.
    job = Background(_config(storage, digits, "preempt", "train.num_workers=[1, 2]", "train.resize_check_s=1",
                             f"train.steps={PREEMPT_STEPS}", "ckpt.every_steps=1000", "train.log_every=2",
                             f'train.resume="{storage}/r1/step_00000010"'))
    job.start()
    _wait(lambda: 10 in _valid_steps(run) and len(_actors("RayTrainWorker", True)) == 2, "training on 2 workers",
          thread=job)
    node_id = _actors("RayTrainWorker", True)[-1].node_id
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    drained_at = time.monotonic()
    subprocess.run([RAY, "drain-node", "--address", cluster.address, "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                    "--deadline-remaining-seconds", "60"], check=True, capture_output=True, timeout=60)
    notice = _wait(lambda: [s for s in _valid_steps(run) if s != 10], "the checkpoint on the preemption notice",
                   thread=job)
    TIMES["drain_notice_to_checkpoint_s"] = time.monotonic() - drained_at
    (at,) = notice
    assert 10 < at < PREEMPT_STEPS, f"the run reached step {at} before the preemption notice made a checkpoint"
    reclaimed_at = time.monotonic()
    cluster.remove_node(node, allow_graceful=False)  # the reclaim
    _refresh_worker_count(cluster)
    job.join(timeout=600)
    assert job.error is None, job.error
    TIMES["preempted_node_gone_to_end_s"] = time.monotonic() - reclaimed_at
    assert job.result["metrics"]["step"] == PREEMPT_STEPS
    assert job.result["metrics"]["resumed_from"] == f"{run}/step_{at:08d}"  # the last start: from the notice's
    assert _valid_steps(run) == {10: 2, at: 2, PREEMPT_STEPS: 1}
