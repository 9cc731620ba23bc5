"""The 2B release rehearsal: the journey of docs/multinode.md, run end to end on a simulated multi-node cluster.

    python bench/rehearse_2b.py                       # the full rehearsal (< 30 min on 2 cores), writes
                                                      # bench/results/rehearsal.json
    python bench/rehearse_2b.py --quick --width 256   # a small version (tests/integration/test_rehearsal.py)

Phases, each with the documented command (docs/multinode.md), on one `ray.cluster_utils.Cluster`:

  cluster  a head (no CPUs: it hosts the Jobs API on 127.0.0.1 with token auth, RAY_AUTH_MODE=token) and
           --nodes worker nodes, each its own raylet on its own loopback address (127.0.0.2, ...), with
           --workers-per-node CPUs: what a GPU node with that many GPUs gives Ray Train (one worker each)
  data     an ImageNet look-alike in the folders layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, 224 px),
           prepared by `ray job submit -- python data_prep/imagenet.py` into shards on a path every node sees
  drill    `ray job submit -- python launchers/train_2b.py --num-workers MIN-MAX` (the 2B recipe, --set only
           shrinking depth, width, steps, batch and eval): a node is removed mid-run (restart at the size left,
           lost steps counted), the node returns (scale-up), then `ray job stop`
  resume   the stopped run resubmitted with --resume at another worker count: weights, manifold state by owner,
           Euclidean state and data position continue exactly (its first checkpoint == the one it resumed)
  width    --width (4096) training steps with real gradients at the recipe's lr (warmup off): peak RSS per rank
           against `lipnext plan` for that shape, FastExp branch counts per step, the step time split,
           checkpoint bytes and save time; every checkpoint certified while training runs on a held-out shard.
           With --quick at the drill's shape (the test suite's) these are measured on the resume run instead,
           which then runs to its next checkpoint and ends (one Ray Train run less; lr as the recipe schedules it)
  certify  `ray job submit -- python launchers/certify.py RUN --actors N` on the width run's last checkpoint at
           the default certify.lipschitz_tol, no --allow-approx: the bound and its loss of radius

Precision is fp32 on these CPU workers (train.precision=fp32: DeepSpeed's bf16 matmuls are ~250x slower on
this CPU; the bf16 flag is the only setting of the multi-node ZeRO file that changes); everything else of the
recipe's optimizer is unchanged, except warmup (off in the width phase, so its steps run at optim.lr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Ray's knobs that docs/multinode.md §7 names: notice a lost node within ~2 s, and retry a start that waits
# for a lost node's workers after 20 s instead of 60 s.
CLUSTER_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
               "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
NOTICE_LINE = re.compile(r"preemption notice: checkpoint written at step (\d+)")
HPZ_LINE = re.compile(r"world size (\d+): (.*hpZ[^\n]*)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, timeout: float = 600, alive=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if alive is not None:
            alive()  # raises when the job it watches has ended
        time.sleep(1.0)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------------------------ the cluster


class RehearsalCluster:
    """Head + worker nodes on distinct loopback addresses, the Jobs API with token auth; `close()` ends all."""

    def __init__(self, nodes: int, cpus_per_node: int):
        import ray
        from ray.cluster_utils import Cluster

        self.cpus_per_node, self.next_ip = cpus_per_node, 2
        port = free_port()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            # The head keeps the machine's address (Ray resolves 127.0.0.1 in an address to it); the worker
            # nodes get 127.0.0.2, ...: Ray Train numbers nodes by address, so they must differ.
            "num_cpus": 0, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": port, "dashboard_agent_listen_port": free_port(),
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
        self.url = f"http://127.0.0.1:{port}"
        self.address = self.cluster.address
        for _ in range(nodes):
            self.add_node()
        self.cluster.wait_for_nodes()
        ray.init(address=self.address, log_to_driver=False)

    def add_node(self):
        ip = f"127.0.0.{self.next_ip}"
        self.next_ip += 1
        return self.cluster.add_node(num_cpus=self.cpus_per_node, node_ip_address=ip,
                                     dashboard_agent_listen_port=free_port())

    def remove_node(self, node_id: str) -> None:
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)  # the raylet and its workers are killed

    def refresh(self) -> None:
        """Ray Train's elastic policy sees the cluster as it is now (the autoscaling coordinator's next 20 s
        tick, now): resizes start within seconds. Only shortens the wait docs/multinode.md §7 describes."""
        import ray

        self.cluster.wait_for_nodes()
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ray.get(coordinator.get_reserved_resources.remote("lipnext-rehearsal", recompute=True))

    def nodes(self) -> list[dict]:
        import ray

        return [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0)}
                for n in ray.nodes() if n.get("Alive")]

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def token_auth_environment(workdir: Path) -> None:
    """Token auth for every node and every client (docs §8: RAY_AUTH_MODE=token and the same token file via
    RAY_AUTH_TOKEN_PATH on every node). Before Ray is imported: it reads RAY_AUTH_MODE once, at import."""
    if "ray" in sys.modules:
        raise RuntimeError("token auth must be set up before `import ray` (Ray reads RAY_AUTH_MODE at import)")
    token = workdir / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update(CLUSTER_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        os.environ.pop(key, None)


# ------------------------------------------------------------------------------------------------ jobs


def ray_job(url: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args, "--address", url], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def submit(url: str, entrypoint: list[str]) -> str:
    """`ray job submit --no-wait -- ENTRYPOINT` (docs §4) with the scripts of this checkout, which every node
    has (docs §1: the package installed on every node); returns the job id. Not `--working-dir .`: on one
    machine the simulated nodes share Ray's runtime_resources directory, and each node's agent unpacks the
    uploaded directory again while the job reads from it (once seen: a DeepSpeed JSON "not found")."""
    entrypoint = [str(REPO / a) if a.endswith(".py") and (REPO / a).is_file() else a for a in entrypoint]
    for _ in range(60):  # the head's job agent registers a few seconds after the dashboard answers
        done = subprocess.run([RAY, "job", "submit", "--address", url, "--no-wait", "--", *entrypoint], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        out = done.stdout + done.stderr
        if "No available agent" not in out:
            break
        time.sleep(1)
    found = re.search(r"Job '([^']+)' submitted successfully", out)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"ray job submit failed:\n{out[-3000:]}")
    return found.group(1)


_CLIENTS: dict = {}


def _client(url: str):
    """The Jobs SDK client (`ray job status/logs` without a CLI process per poll; token from the env)."""
    from ray.job_submission import JobSubmissionClient

    if url not in _CLIENTS:
        _CLIENTS[url] = JobSubmissionClient(url)
    return _CLIENTS[url]


def job_status(url: str, job: str) -> str:
    return str(_client(url).get_job_status(job).value)


def job_logs(url: str, job: str) -> str:
    return _client(url).get_job_logs(job)


def stop_job(url: str, job: str) -> None:
    """`ray job stop JOB` (docs §4), then wait until its workers are gone."""
    ray_job(url, ["stop", job], timeout=120)
    wait_for(lambda: job_status(url, job) in ("STOPPED", "FAILED", "SUCCEEDED"), "the job to stop", 120)
    wait_for(lambda: not train_workers(), "the workers to end", 120)


def running(url: str, job: str):
    """A check for wait_for: raises, with the job's log tail, once the job is no longer running."""
    def check() -> None:
        status = job_status(url, job)
        if status not in ("PENDING", "RUNNING"):
            raise RuntimeError(f"job {job} ended ({status}: {_client(url).get_job_info(job).message}):\n"
                               f"{job_logs(url, job)[-4000:]}")
    return check


def wait_job(url: str, job: str, timeout: float) -> str:
    status = wait_for(lambda: (s := job_status(url, job)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                      f"job {job}", timeout)
    if status != "SUCCEEDED":
        raise RuntimeError(f"job {job} {status} ({_client(url).get_job_info(job).message}):\n"
                           f"{job_logs(url, job)[-4000:]}")
    return job_logs(url, job)


def hpz_lines(logs: str) -> dict[int, str]:
    return {int(w): reason for w, reason in HPZ_LINE.findall(logs)}


# ------------------------------------------------------------------------------------------------ measurements


def train_workers(alive_only: bool = True) -> list:
    import ray
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive_only else [])
    # This cluster's address, not one resolved from the machine: beside other Ray instances (the test suite's),
    # an unset address makes Ray scan for every GCS process and warn each poll.
    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    return list_actors(address=address, filters=filters, limit=1000, raise_on_missing_output=False)


class RssMonitor(threading.Thread):
    """Peak resident size (VmHWM) of every Ray Train worker process of this cluster, polled."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, dict] = {}
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(1.0):
            try:
                workers = train_workers()
            except Exception:  # noqa: BLE001 (the state API is briefly unavailable during restarts)
                continue
            for w in workers:
                hwm = _vm_hwm(w.pid)
                if hwm:
                    entry = self.peaks.setdefault(w.pid, {"pid": w.pid, "node_id": w.node_id[:8], "peak_rss": 0})
                    entry["peak_rss"] = max(entry["peak_rss"], hwm)

    def stop(self) -> list[dict]:
        self.stopped.set()
        self.join(timeout=10)
        return sorted(self.peaks.values(), key=lambda e: -e["peak_rss"])


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def scalars(run: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall time)] of a run's TensorBoard (rank 0's) scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def valid_steps(run: Path) -> dict[int, int]:
    """step -> world size of the run's valid checkpoints."""
    from lipnext_scale.ckpt import CheckpointError, list_checkpoints, validate_checkpoint

    out = {}
    for step, url in list_checkpoints(str(run)):
        try:
            out[step] = validate_checkpoint(url)["world_size"]
        except (CheckpointError, OSError):
            continue
    return out


def same_state(a_url: str, b_url: str) -> dict[str, int]:
    """Weights, manifold state by owner and Euclidean (AdamW/NAdam) state bit-identical; raises otherwise.
    Returns how many tensors of each were compared."""
    import torch

    from lipnext_scale.ckpt import load_manifold_state, load_train_state

    a, b = load_train_state(a_url), load_train_state(b_url)
    names = sorted(a.meta["manifold_owners"])
    manifold = [{f"{k}/{n}": v for n, e in load_manifold_state(u, names).items() for k, v in e.items()}
                for u in (a_url, b_url)]
    groups = [("weights", a.params, b.params), ("manifold state", *manifold),
              *[(f"euclidean {k}", a.optim[k], b.optim[k]) for k in a.optim]]
    for what, x, y in groups:
        if x.keys() != y.keys():
            raise AssertionError(f"{what}: different tensors in {a_url} and {b_url}")
        diff = {n: float((x[n] - y[n]).abs().max()) for n in x if not torch.equal(x[n], y[n])}
        if diff:
            raise AssertionError(f"{what} differ between {a_url} and {b_url}: {diff}")
    if a.optim_scalars != b.optim_scalars or a.manifold_extra != b.manifold_extra:
        raise AssertionError(f"optimizer scalars differ between {a_url} and {b_url}")
    return {what: len(x) for what, x, _ in groups}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------ the phases


def make_imagenet_lookalike(root: Path, classes: int, train_per_class: int, val_per_class: int) -> dict:
    """ImageNet's folders layout (a) of lipnext_scale/data/sources/imagenet.py: wnid folders of 224-px JPEGs
    whose colour and stripes depend on the class (learnable, not trivially)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            base = rng.uniform(40, 215, size=3)
            for i in range(per_class):
                img = rng.normal(base, 40, size=(224, 224, 3))
                img[:, (c * 7 + i) % 16::16] += 60
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * per_class + i:08d}.JPEG"
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / wnid / name, quality=90)
    return {"classes": classes, "train_images": classes * train_per_class, "val_images": classes * val_per_class,
            "layout": "folders: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG", "image_px": 224}


def shrink(args, *, width: int, depth: int, steps: int, micro: int, global_batch: int, every: int) -> list[str]:
    """The --set overrides of the 2B recipe the rehearsal uses: depth, width, steps, batch, eval; CPU workers."""
    return [f"model.width={width}", f"model.depth={depth}", f"model.num_classes={args.classes}",
            f"data.batch_size={micro}", f"train.global_batch={global_batch}", "data.loader_processes=0",
            "data.shuffle_buffer=64", f"train.steps={steps}", f"ckpt.every_steps={every}", "ckpt.keep_last=1000",
            "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.precision=fp32",
            "train.use_gpu=false", "train.progress_bar=false", "train.deterministic_data=true",
            "train.max_failures=10",
            # the recipe's warmup is 5 % of its schedule (25,020 of 500,400 steps): the same share of this one
            f"optim.warmup_steps={max(1, steps // 20)}"]


def launcher(data: Path, storage: Path, workers: str, overrides: list[str], resume: str | None = None) -> list[str]:
    cmd = ["python", "launchers/train_2b.py", "--data", str(data), "--storage", str(storage), "--num-workers", workers]
    if resume:
        cmd += ["--resume", resume]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


class Rehearsal:
    """The phases in order; `results` is what bench/results/rehearsal.json gets."""

    def __init__(self, args, workdir: Path):
        self.args, self.workdir = args, workdir
        self.data, self.storage = workdir / "imagenet-shards", workdir / "runs"
        self.certify_data = self.data  # certification reads the training prep's val split (centre crop)
        self.results: dict = {"phases_s": {}}
        self.cluster: RehearsalCluster | None = None
        self.width_run: Path | None = None  # the run the width figures come from, certified at the end

    def timed(self, phase: str, fn):
        started = time.monotonic()
        out = fn()
        self.results["phases_s"][phase] = round(time.monotonic() - started, 1)
        print(f"[rehearsal] {phase}: {self.results['phases_s'][phase]} s", flush=True)
        return out

    # cluster ------------------------------------------------------------------------------------------
    def start_cluster(self) -> None:
        a = self.args
        self.cluster = RehearsalCluster(a.nodes, a.workers_per_node)
        refused = ray_job(self.cluster.url, ["list"], timeout=60)  # the Jobs API refuses a client without it
        env_no_token = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        anonymous = subprocess.run([RAY, "job", "list", "--address", self.cluster.url], env=env_no_token,
                                   capture_output=True, text=True, timeout=60, cwd=REPO)
        self.results["cluster"] = {"nodes": self.cluster.nodes(), "jobs_api": self.cluster.url,
                                   "token_auth": refused.returncode == 0 and anonymous.returncode != 0}

    # data ---------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        a, source = self.args, self.workdir / "imagenet-source"
        info = make_imagenet_lookalike(source, a.classes, a.train_per_class, a.val_per_class)
        job = submit(self.cluster.url, ["python", "data_prep/imagenet.py", "--source", str(source), "--out",
                                        str(self.data), "--shard-size", str(a.shard_size), "--no-progress"])
        wait_job(self.cluster.url, job, timeout=900)
        info["shards"] = {s: len(list(self.data.glob(f"{s}-*.tar"))) for s in ("train", "val")}
        # Certification reads the same val split (stored at 256 px) and takes its centre 224 crop, exactly as
        # training's evaluation does (certify/data_access.py evaluation_view): no second prep job.
        info["certify_view"] = "val split as prepared (short side 256), centre 224 crop"
        self.results["data"] = info

    # drill --------------------------------------------------------------------------------------------
    def drill(self) -> None:
        """Elastic launch, a node lost, the node back, the job stopped."""
        a, url = self.args, self.cluster.url
        low, high = a.nodes_min * a.workers_per_node, a.nodes * a.workers_per_node
        run = self.storage / "drill"
        over = [*shrink(a, width=a.drill_width, depth=a.drill_depth, steps=a.steps, micro=a.micro_batch,
                        global_batch=a.global_batch, every=a.ckpt_every), "train.name=drill", "train.resize_check_s=1",
                "certify.during_training=false"]
        started = time.monotonic()
        job = submit(url, launcher(self.data, self.storage, f"{low}-{high}", over))
        alive = running(url, job)
        wait_for(lambda: [s for s in valid_steps(run) if s >= 2 * a.ckpt_every], "the first checkpoints", alive=alive)
        victim = next(n["node_id"] for n in self.cluster.nodes()
                      if n["node_id"] in {w.node_id for w in train_workers()})
        lost_wall = time.time()
        self.cluster.remove_node(victim)
        self.cluster.refresh()
        small = wait_for(lambda: [s for s, w in valid_steps(run).items() if w < high], "a checkpoint at fewer workers",
                         alive=alive)
        joined_wall = time.time()
        self.cluster.add_node()
        self.cluster.refresh()
        grown = wait_for(lambda: [s for s, w in valid_steps(run).items() if w == high and s > min(small)],
                         "a checkpoint at the full size again", alive=alive)
        # A preemption (docs §7): the node drained as a spot reclaim does; the workers checkpoint on the notice,
        # then the node goes and the run restarts on the nodes left from there. In this job: a new elastic job
        # right after `ray job stop` would wait out the stopped job's coordinator request (up to 180 s).
        preempt_wall, drained = time.time(), time.monotonic()
        node_id = train_workers()[-1].node_id
        subprocess.run([RAY, "drain-node", "--address", self.cluster.address, "--node-id", node_id, "--reason",
                        "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (rehearsal)",
                        "--deadline-remaining-seconds", "60"], check=True, capture_output=True, timeout=60)
        notice = int(wait_for(lambda: NOTICE_LINE.search(job_logs(url, job)), "the checkpoint on the notice",
                              alive=alive).group(1))
        notice_s = time.monotonic() - drained
        wait_for(lambda: notice in valid_steps(run), f"the notice's checkpoint {notice}", alive=alive)
        self.cluster.remove_node(node_id)
        self.cluster.refresh()
        after = wait_for(lambda: [s for s, w in valid_steps(run).items() if w < high and s > notice],
                         "a checkpoint at fewer workers after the preemption", alive=alive)
        stop_at = min(after)
        stop_job(url, job)
        self.cluster.add_node()  # the capacity back for the next phases
        self.cluster.refresh()
        logs = job_logs(url, job)
        tb = scalars(run)
        starts = [(int(s), int(v), t) for s, v, t in tb["run/world_size"]]
        steps_logged = [(s, t) for s, _, t in tb.get("train/loss", [])]
        shrink_start = next((s, w, t) for s, w, t in starts if t > lost_wall)
        grow_start = next((s, w, t) for s, w, t in starts if t > joined_wall)
        preempt_start = next((s, w, t) for s, w, t in starts if t > preempt_wall)
        reached = max(s for s, t in steps_logged if t < shrink_start[2])
        self.results["drill"] = {
            "command": " ".join(["ray job submit ... --"] + launcher(Path("DATA"), Path("STORAGE"), f"{low}-{high}",
                                                                      over)),
            "deepspeed_config": json.loads((run / "config.json").read_text())["train"]["deepspeed"],
            "width": a.drill_width, "depth": a.drill_depth, "num_workers": f"{low}-{high}",
            "starts": [{"step": s, "world_size": w} for s, w, _ in starts],
            "node_loss": {"at_step_reached": reached, "restarted_from_step": shrink_start[0],
                          "world_size_after": shrink_start[1], "lost_steps": reached - shrink_start[0],
                          "loss_to_restart_s": round(shrink_start[2] - lost_wall, 1)},
            "node_add": {"restarted_from_step": grow_start[0], "world_size_after": grow_start[1],
                         "join_to_restart_s": round(grow_start[2] - joined_wall, 1)},
            "preemption": {"notice_checkpoint_step": notice, "drain_to_checkpoint_s": round(notice_s, 1),
                           "restarted_from_step": preempt_start[0], "world_size_after": preempt_start[1]},
            "stopped_after_step": stop_at, "checkpoints": valid_steps(run),
            "hpz_by_world_size": hpz_lines(logs), "wall_s": round(time.monotonic() - started, 1)}

    # resume -------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """The stopped run resubmitted from its last checkpoint at another worker count (docs §6, §7). With
        `args.width_on_resume` (--quick at the drill's shape) it also is the width phase: it runs to its next
        checkpoint and ends (train.steps), certifying its checkpoints in the run, measured as `width` does."""
        a, url = self.args, self.cluster.url
        at = self.results["drill"]["stopped_after_step"]
        source = self.storage / "drill" / f"step_{at:08d}"
        run = self.storage / "drill-resumed"
        workers, end_step = a.resume_workers, at + a.ckpt_every
        over = [*shrink(a, width=a.drill_width, depth=a.drill_depth, steps=a.steps, micro=a.micro_batch,
                        global_batch=a.global_batch, every=a.ckpt_every), "train.name=drill-resumed",
                *([f"train.steps={end_step}", *self._in_run_certify_overrides()] if a.width_on_resume
                  else ["certify.during_training=false"])]
        command = launcher(self.data, self.storage, str(workers), over, resume=str(source))
        if a.width_on_resume:
            logs, peaks = self._run_measured(command)
        else:
            job = submit(url, command)
            wait_for(lambda: end_step in valid_steps(run), f"step {end_step} after the resume", alive=running(url, job))
            stop_job(url, job)
            logs = job_logs(url, job)
        from lipnext_scale.ckpt import load_train_state

        compared = same_state(str(source), str(run / f"step_{at:08d}"))  # the copy its first save wrote
        state = load_train_state(str(run / f"step_{at:08d}"))
        tc = state.config["train"]
        position = state.data["batches_per_rank"] == at * tc["grad_accum"]
        end = load_train_state(str(run / f"step_{end_step:08d}"))
        self.results["resume"] = {
            "from": f"step {at} at {load_train_state(str(source)).world_size} workers", "to_workers": workers,
            "state_identical": True, "tensors_compared": compared, "data_position_exact": position,
            "batches_per_rank_at_resume": state.data["batches_per_rank"],
            "finished_step": end.step, "finished_world_size": end.world_size, "hpz_by_world_size": hpz_lines(logs)}
        if a.width_on_resume:
            self.width_run = run
            self.results["width"] = {**self._width_measurements(run, workers, peaks, logs),
                                     "measured_on": "the resume run (--quick: the width phase's shape is the drill's)"}
        if not position:
            raise AssertionError(f"data position after resume: {state.data} at grad_accum {tc['grad_accum']}")

    # width --------------------------------------------------------------------------------------------
    def width(self) -> None:
        a = self.args
        run = self.width_run = self.storage / "width"
        workers = a.width_workers
        over = [*shrink(a, width=a.width, depth=a.depth, steps=a.width_steps, micro=1, global_batch=workers, every=1),
                "train.name=width", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",  # the recipe's lr, flat
                *self._in_run_certify_overrides()]
        logs, peaks = self._run_measured(launcher(self.data, self.storage, str(workers), over))
        self.results["width"] = self._width_measurements(run, workers, peaks, logs)

    def _run_measured(self, command: list[str]) -> tuple[str, list[dict]]:
        """Submit a training job and wait for its end, its workers' peak RSS polled meanwhile: (logs, peaks)."""
        monitor = RssMonitor()
        monitor.start()
        try:
            logs = wait_job(self.cluster.url, submit(self.cluster.url, command), timeout=1800)
        finally:
            peaks = monitor.stop()
        return logs, peaks

    def _in_run_certify_overrides(self) -> list[str]:
        """Every checkpoint certified while the run goes on, on the first held-out shard."""
        held_out = sorted(self.certify_data.glob("val-*.tar"))[0]
        return ["certify.during_training=true", f"certify.data_url={json.dumps(str(held_out))}",
                "certify.resources={CPU=1}", "certify.actors=0", "certify.batch_size=16"]

    def _width_measurements(self, run: Path, workers: int, peaks: list[dict], logs: str) -> dict:
        """What the width phase reports, from a finished run's TensorBoard scalars, checkpoints and config."""
        from lipnext_scale.config import config_from_dict

        cfg = config_from_dict(json.loads((run / "config.json").read_text()))  # the run's resolved config
        tb = scalars(run)
        by_step = lambda tag: {int(s): v for s, v, _ in tb.get(tag, [])}  # noqa: E731
        branches = sorted(t[len("fast_exp/share_"):] for t in tb if t.startswith("fast_exp/share_"))
        updates = by_step("fast_exp/updates")
        fast_exp = [{"step": s, "updates": int(n), **{b: round(by_step(f"fast_exp/share_{b}")[s] * n)
                                                       for b in branches}} for s, n in sorted(updates.items())]
        phases = {"data": "data", "forward": "forward", "backward": "backward", "manifold": "retraction",
                  "euclidean": "optimizer", "checkpoint": "checkpoint"}
        split = {k: {str(s): round(v, 3) for s, v in by_step(f"time/{tag}").items()} for k, tag in phases.items()}
        ckpts = sorted(run.glob("step_*"))
        micro = cfg.batch_plan(workers).micro  # as the run batched its steps at this world size
        plan = self._plan(workers, micro, cfg)
        return {
            "width": cfg.model.width, "depth": cfg.model.depth, "workers": workers, "micro_batch": micro,
            "precision": "fp32", "lr_by_step": {str(s): v for s, v in sorted(by_step("train/lr").items())},
            "optim": {k: getattr(cfg.optim, k) for k in ("lr", "warmup_steps", "total_steps", "min_lr_ratio")},
            "steps": len(fast_exp), "fast_exp_counts_per_step": fast_exp, "step_time_split_s": split,
            "checkpoint_bytes": {c.name: dir_bytes(c) for c in ckpts}, "checkpoint_save_s": split["checkpoint"],
            "peak_rss_bytes_per_rank": peaks, "plan": plan, "hpz_by_world_size": hpz_lines(logs),
            "in_run_certification": self._in_run_certificates(run),
            "peak_rss_vs_plan": [round(p["peak_rss"] / plan["total_bytes"], 3) for p in peaks]}

    def _plan(self, workers: int, micro: int, cfg) -> dict:
        """`lipnext plan` for exactly the measured run's shape (its constants as they are: this is their check)."""
        from lipnext_scale.plan import CPU_RUNTIME_BYTES, ZeroSettings, memory_plan

        zero = json.loads((REPO / cfg.train.deepspeed).read_text())["zero_optimization"]
        plan = memory_plan("lipnext-2b", workers, micro, optim_cfg=cfg.optim,
                           zero=ZeroSettings(zero.get("stage3_prefetch_bucket_size", 50_000_000),
                                             zero.get("reduce_bucket_size", 50_000_000), precision="fp32"),
                           runtime_bytes=CPU_RUNTIME_BYTES, width=cfg.model.width, depth=cfg.model.depth)
        return {"command": f"lipnext plan lipnext-2b --gpus {workers} --gpu-mem 24 --micro-batch {micro} "
                           f"--precision fp32 --device cpu --width {cfg.model.width} --depth {cfg.model.depth} "
                           f"(buckets of {cfg.train.deepspeed})",
                "total_bytes": plan["total_bytes"], "bytes": plan["bytes"], "phases": plan["phases"]}

    def _in_run_certificates(self, run: Path) -> list[dict]:
        summary = run / "certify" / "summary.json"
        if not summary.is_file():
            return []
        data = json.loads(summary.read_text())
        entries = data.get("checkpoints", data) if isinstance(data, dict) else data
        return entries if isinstance(entries, list) else [entries]

    # certify ------------------------------------------------------------------------------------------
    def certify(self) -> None:
        a, url = self.args, self.cluster.url
        out = self.workdir / "certify-width"
        wait_job(url, submit(url, ["python", "launchers/certify.py", str(self.width_run), "--data",
                                   str(self.certify_data / "val"), "--out", str(out), "--actors", str(a.certify_actors),
                                   "--no-progress"]), timeout=1800)
        from ray.util.state import list_actors

        actors = list_actors(filters=[("class_name", "=", "ShardCertifier")], limit=1000,
                             raise_on_missing_output=False)
        report = json.loads((out / "report.json").read_text())
        bound = report["lipschitz"]["lipschitz_used"]
        self.results["certify"] = {"report": report, "actor_nodes": sorted({x.node_id[:8] for x in actors}),
                                   "lipschitz_bound": bound, "radius_loss": 1.0 - 1.0 / bound,
                                   "width": self.args.width, "depth": self.args.depth}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=4096, help="width of the width phase (memory, FastExp, bound)")
    p.add_argument("--depth", type=int, default=2, help="depth of the width phase")
    p.add_argument("--width-steps", type=int, default=2)
    p.add_argument("--width-workers", type=int, default=2, help="workers of the width phase (one per node)")
    p.add_argument("--steps", type=int, default=200, help="train.steps of the fault drill (the schedule; the drill "
                                                          "stops the job after its faults, well before)")
    p.add_argument("--drill-width", type=int, default=256)
    p.add_argument("--drill-depth", type=int, default=2)
    p.add_argument("--nodes", type=int, default=3, help="worker nodes (each its own raylet and loopback address)")
    p.add_argument("--workers-per-node", type=int, default=2, help="CPUs (= training workers) per node")
    p.add_argument("--quick", action="store_true", help="a small version: 1 worker per node, fewer images/steps")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "rehearsal.json"))
    p.add_argument("--workdir", default=None, help="where data and runs go (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.quick:
        args.workers_per_node = 1
        args.drill_width, args.drill_depth, args.depth = min(args.drill_width, 64), 1, min(args.depth, 1)
        args.width_steps = min(args.width_steps, 2)
    w = args.workers_per_node
    args.nodes_min = args.nodes - 1
    # Every world size of the range (and the resume's) splits the global batch: lcm of the sizes x 2.
    import math

    sizes = list(range(args.nodes_min * w, args.nodes * w + 1))
    # the drill ends at the range's low end (after the preemption): the resume goes to another count
    args.resume_workers = args.nodes * w - 1 if w > 1 else args.nodes * w
    args.global_batch = math.lcm(*sizes, args.resume_workers)
    args.micro_batch = max(1, args.global_batch // min(sizes))
    args.ckpt_every = 4 if args.quick else 5
    args.classes = 10
    args.train_per_class, args.val_per_class, args.shard_size = (6, 2, 6) if args.quick else (24, 8, 10)
    args.certify_actors = 2
    # --quick at the drill's shape: the width phase would be another run of the resume's model on the same
    # workers; the resume run (ended at its next checkpoint) is measured instead: one Ray Train run less.
    args.width_on_resume = args.quick and (args.width, args.depth, args.width_workers) == (
        args.drill_width, args.drill_depth, args.resume_workers)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="rehearsal-")) if owned else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    token_auth_environment(workdir)
    if args.quick:
        # The wait that ends a start asking for a lost node's CPUs is a placement-group reservation (bookkeeping,
        # not process start-up): 8 s is ample on an idle simulated cluster, and a timed-out start is retried
        # (a controller failure, unlimited by default), so the small drill does not sit 20 s per node loss.
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "8"
        # Ray Train's controller takes one report off each worker per poll (every 2 s by default): the small
        # drill's steps take a fraction of a second, so reports would queue and each run's end wait for them.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped rehearsal still shuts its cluster down
    started = time.monotonic()
    r = Rehearsal(args, workdir)
    try:
        r.timed("cluster", r.start_cluster)
        r.timed("data", r.prepare_data)
        r.timed("drill", r.drill)
        r.timed("resume", r.resume)
        if not args.width_on_resume:  # else measured on the resume run
            r.timed("width", r.width)
        r.timed("certify", r.certify)
    except BaseException as e:
        r.results["error"] = f"{type(e).__name__}: {e}"[:4000]  # what ran is still written, with why it stopped
        raise
    finally:
        if r.cluster is not None:
            r.cluster.close()
        r.results["total_s"] = round(time.monotonic() - started, 1)
        r.results["conditions"] = conditions(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(r.results, indent=2, default=str) + "\n")
    print(f"[rehearsal] done in {r.results['total_s']} s -> {args.out}")
    if owned:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def conditions(args) -> dict:
    import platform

    import deepspeed
    import ray
    import torch

    return {"command": " ".join(["python", "bench/rehearse_2b.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads 1 per worker",
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "ray": ray.__version__},
            "precision": "fp32 (bf16 matmuls ~250x slower on this CPU); the recipe's optimizer otherwise unchanged",
            "model": "lipnext-2b recipe (patch 16, 224 px) with --set width/depth/steps/batch/eval only",
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}}


if __name__ == "__main__":
    sys.exit(main())
