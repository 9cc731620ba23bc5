"""Scale smoke (a bench, not CI): the real 4096-wide LipNeXt matrices under DeepSpeed ZeRO-3 on 2 CPU ranks,
through every phase a large run goes through, with each rank's peak memory next to `lipnext plan`'s
prediction. Writes bench/results/scale.json.

Precision: bf16 where the CPU multiplies bf16 natively (AVX512-BF16/AMX); elsewhere fp32 (the default), because
a CPU without it multiplies bf16 hundreds of times slower than fp32 (the bench measures both and records them:
on the 2-core AVX2 machine of bench/results/scale.json one 196 x 4096 x 4096 product takes 0.1 s in fp32 and
31 s in bf16, so one bf16 step of a 4096-wide model would take hours). The ZeRO-3 settings are those of
configs/deepspeed/zero3_bf16.json either way (the job's precision sets DeepSpeed's bf16 flag).

  baseline   lipnext-tiny on 2 ranks: a CPU rank's resident size before its model (plan.CPU_RUNTIME_BYTES)
  train      lipnext-1b's width (4096) and patch/image size (16/224) at --depth blocks, 2 ranks, 3 steps, then
             the checkpoint (the loop writes it at the last step)
  resume     the checkpoint re-partitioned onto 1 rank (train.global_batch=2 kept: 2 accumulation steps
             there), 1 more step and its checkpoint
  export     the 1-rank checkpoint consolidated to safetensors
  certify    16 images certified from the export (in this process)

Each rank's RSS is sampled from /proc (VmRSS) every 0.1 s and split into windows: startup (Ray Train,
DeepSpeed, the model's init, the resume; up to the first step), steps (up to the last step's TensorBoard
scalars) and checkpoint (the save after them); with the kernel's high-water mark (VmHWM) of the run. The plan
predicts the steps window (tests/unit/test_plan.py: within 20 %). Before the jobs, the manifold update's
workspace (plan.MANIFOLD_UPDATE_WORKSPACE) is measured in a child process. Data: digits at 224 px, 10 classes.

Comparisons (bench/paired.py; under "comparisons"):
  matmul_bf16_vs_fp32               one-thread GFLOPS of the 196 x W x W product, bf16 / fp32, measured back to
                                    back in each of --rounds rounds (why this CPU trains in fp32)
  plan_vs_measured_rss_train_2_ranks, plan_vs_measured_rss_resume_1_rank
                                    `lipnext plan`'s per-rank total / the busiest rank's measured steps peak RSS
                                    (one round: one training job each; the plan aims at 0.8-1.2)

    RAY_AUTH_MODE=disabled python bench/bench_scale.py [--depth 4] [--rounds 3] [--out bench/results/scale.json]
    RAY_AUTH_MODE=disabled python bench/bench_scale.py --quick --out /tmp/scale.json   # smoke: width 256, depth 1

Needs ~(2 x the plan's per-rank total) of free memory; run it on a quiet machine (`uptime`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_train import machine_info, read_scalars  # noqa: E402  (the shared machine description)
from paired import comparison, paired_order  # noqa: E402  (bench/paired.py)

GIB = 2 ** 30
STEP_PHASES = ("data", "forward", "backward", "retraction", "optimizer")
PRECISION = "fp32"  # set from --precision
RECIPE = "configs/train/imagenet_2b.toml"  # shrunk to the smoke's model by --set values only
MODEL = "lipnext-1b"  # its width, patch and image size; --depth blocks (--width in smoke runs)
IMAGE_SIZE, NUM_CLASSES, CERTIFY_IMAGES = 224, 10, 16


def matmul_gflops(width: int, rounds: int) -> dict[str, list[float]]:
    """One-thread throughput of a 196 x width x width product (a 224 px image's tokens through one matrix), fp32
    and bf16 back to back in each round (reversed on odd rounds)."""
    import torch

    torch.set_num_threads(1)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out: dict[str, list[float]] = {name: [] for name in dtypes}
    for dtype in dtypes.values():  # warm-up: kernels and thread pool, on a small product
        torch.randn(196, 256, dtype=dtype) @ torch.randn(256, 256, dtype=dtype)
    for r in range(rounds):
        for name in paired_order(r, list(dtypes)):
            a, b = torch.randn(196, width, dtype=dtypes[name]), torch.randn(width, width, dtype=dtypes[name])
            t0 = time.perf_counter()
            a @ b
            out[name].append(round(2 * 196 * width * width / (time.perf_counter() - t0) / 1e9, 2))
    return out


class RssMonitor(threading.Thread):
    """Polls VmRSS/VmHWM of this process's Ray Train worker processes (they descend from its raylet)."""

    def __init__(self, period_s: float = 0.1):
        super().__init__(daemon=True)
        self.period_s, self.samples, self.stop = period_s, [], threading.Event()

    @staticmethod
    def _workers() -> list[int]:
        import psutil

        out = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    out.append(proc.pid)
            except psutil.Error:
                continue
        return out

    @staticmethod
    def _status(pid: int) -> dict[str, int] | None:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
        except (OSError, KeyError, ValueError):
            return None

    def run(self):
        while not self.stop.is_set():
            now = time.time()
            for pid in self._workers():
                status = self._status(pid)
                if status:
                    self.samples.append((now, pid, status["VmRSS"], status["VmHWM"]))
            self.stop.wait(self.period_s)

    def peaks(self, start: float, end: float, ranks: int) -> list[int]:
        """The `ranks` largest per-process peaks of sampled RSS between wall times `start` and `end`."""
        out: dict[int, int] = {}
        for t, pid, rss, _ in self.samples:
            if start <= t <= end:
                out[pid] = max(out.get(pid, 0), rss)
        return sorted(out.values(), reverse=True)[:ranks]

    def high_water(self, ranks: int) -> list[int]:
        """The kernel's own peak RSS (VmHWM) of the `ranks` largest processes over the whole run."""
        out: dict[int, int] = {}
        for _, pid, _, hwm in self.samples:
            out[pid] = max(out.get(pid, 0), hwm)
        return sorted(out.values(), reverse=True)[:ranks]


def measure_manifold_workspace(matrices: int, size: int = 4096) -> float:
    """Peak fp32 temporaries of one owner's round of `matrices` square size x size matrices, per fp32 element
    of the round: `ShardedManifoldStep._update_owned`'s work (stack the round's matrices, gradients and
    state, `manifold_update`, per-matrix copies of the new state) with its inputs already held. The plan's
    MANIFOLD_UPDATE_WORKSPACE. Runs in a child process, so its peak RSS is the round's alone."""
    import subprocess

    code = f"""
import torch
torch.set_num_threads(1)
from lipnext_scale.config import OptimConfig
from lipnext_scale.optim.update import StepAt, manifold_update
def rss(key):
    return int(dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())[key].split()[0]) * 1024
n, c = {matrices}, {size}
masters = [torch.linalg.qr(torch.randn(c, c))[0].contiguous() for _ in range(n)]
grads = [torch.randn(c, c) * 1e-3 for _ in range(n)]
states = [{{"exp_avg": torch.zeros(c, c), "exp_avg_sq": torch.zeros(c, c), "slow": m.clone(),
           "delta_sum": torch.zeros(c, c)}} for m in masters]
base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the current RSS
stacked = {{k: torch.stack([s[k] for s in states]) for k in states[0]}}
new = manifold_update(torch.stack(masters), torch.stack(grads), stacked, StepAt(0, 0.002), cfg=OptimConfig())
states = [{{k: v[i].clone() for k, v in stacked.items()}} for i in range(n)]
print((rss("VmHWM") - base) / (4 * n * c * c))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return round(float(done.stdout.strip().splitlines()[-1]), 2)


def _overrides(data: Path, storage: Path, name: str, shape: tuple[int, int], *extra: str) -> list[str]:
    """The job's --set values: the recipe shrunk to `shape` = (width, depth) of MODEL, then `extra`."""
    from lipnext_scale.train.cli import dataset_overrides, toml_string

    width, depth = shape
    return [*dataset_overrides(str(data)), f"train.storage={toml_string(str(storage))}", f"train.name={name}",
            f"model.name={MODEL}", f"model.width={width}", f"model.depth={depth}", f"model.num_classes={NUM_CLASSES}",
            f"model.image_size={IMAGE_SIZE}",
            "data.dataset=digits", "data.batch_size=1", "data.loader_processes=0", "data.shuffle_buffer=16",
            'data.eval_url=""', "train.global_batch=2", f"train.precision={PRECISION}", "train.use_gpu=false",
            'train.deepspeed="configs/deepspeed/zero3_bf16.json"', "train.log_every=1", "train.eval_every=0",
            "train.progress_bar=false", "optim.warmup_steps=0", "ckpt.keep_last=2", "ckpt.upload=sync",
            "certify.during_training=false", *extra]


def run_job(overrides: list[str], label: str) -> dict:
    """One training job with its workers' memory watched; phase times from its TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lipnext_scale.train.cli import build_train_config
    from lipnext_scale.train.trainer import run_training

    cfg = build_train_config(RECIPE, overrides)
    monitor = RssMonitor()
    monitor.start()
    started = time.time()
    try:
        result = run_training(cfg)
    finally:
        monitor.stop.set()
        monitor.join()
    ended = time.time()
    tb = Path(result["run_dir"]) / "tensorboard"
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    first_step = min(e.wall_time for e in acc.Scalars("run/world_size"))  # built and resumed, about to step
    last_logged = max(e.wall_time for e in acc.Scalars("train/loss"))  # the last step, before its checkpoint
    written = max(f.stat().st_mtime for f in Path(result["checkpoint"]).iterdir())  # its last file
    scalars = read_scalars(tb)
    steps = sorted(scalars["time/data"])
    ranks = cfg.train.worker_range[1]
    out = {
        "workers": ranks, "steps": steps,
        "startup_s": round(first_step - started, 1),  # Ray Train, DeepSpeed, zero.Init of the model, resume
        "step_s": {s: round(sum(scalars[f"time/{p}"][s] for p in STEP_PHASES), 2) for s in steps},
        "step_split_s": {p: [round(scalars[f"time/{p}"][s], 2) for s in steps] for p in STEP_PHASES},
        "checkpoint_s": round(written - last_logged, 1),  # the loop saves right after the last step's scalars
        "run_wall_s": round(ended - started, 1),
        # sampled RSS (every 0.1 s) per window, largest process first; the kernel's high-water mark of the run
        "peak_rss_bytes": {"startup": monitor.peaks(started, first_step, ranks),
                           "steps": monitor.peaks(first_step, last_logged, ranks),
                           "checkpoint": monitor.peaks(last_logged, ended, ranks),
                           "whole_run_high_water": monitor.high_water(ranks)},
        "checkpoint": result["checkpoint"],
    }
    print(f"[bench] {label}: {json.dumps(out)}", flush=True)
    return out


def zero_settings() -> dict[str, int]:
    from lipnext_scale.train.preflight import read_deepspeed_config

    zero = read_deepspeed_config("configs/deepspeed/zero3_bf16.json")["zero_optimization"]
    return {"prefetch_bucket_size": int(zero["stage3_prefetch_bucket_size"]),
            "reduce_bucket_size": int(zero["reduce_bucket_size"])}


def predicted(shape: tuple[int, int], ranks: int, micro_batch: int, runtime_bytes: int) -> dict:
    from lipnext_scale.plan import ZeroSettings, memory_plan

    from lipnext_scale.config import load_config

    width, depth = shape
    optim = load_config(REPO / RECIPE).optim  # the recipe's optimizer: Lookahead copies, manifold buckets
    plan = memory_plan(MODEL, ranks, micro_batch, zero=ZeroSettings(**zero_settings(), precision=PRECISION),
                       runtime_bytes=runtime_bytes, optim_cfg=optim, num_classes=NUM_CLASSES, width=width, depth=depth,
                       image_size=IMAGE_SIZE)
    return {"bytes": plan["bytes"], "total_bytes": plan["total_bytes"], "params": plan["params"],
            "phases": plan["phases"], "manifold_state_bytes_by_rank": plan["manifold_state_bytes_by_rank"]}


def run_phases(shape: tuple[int, int], tmp: Path) -> tuple[dict, dict[str, dict], int, dict]:
    """Prepare, the tiny baseline job, train on 2 ranks, resume on 1, export, certify: (phase times, the two
    jobs' figures by name, the baseline's peak RSS, the certification report's summary)."""
    from lipnext_scale.ckpt import export_checkpoint
    from lipnext_scale.certify.job import CertifyRuntime, certify_job
    from lipnext_scale.config import CertifyConfig
    from lipnext_scale.data.prep import ShardFormat, prepare

    phases = {}
    t0 = time.perf_counter()
    prepare("digits", None, str(tmp / "digits224"), ShardFormat(shard_size=CERTIFY_IMAGES, image_size=IMAGE_SIZE),
            progress=False, workers=2)
    phases["prepare_data_s"] = round(time.perf_counter() - t0, 1)
    tiny = run_job(_overrides(tmp / "digits224", tmp / "runs", "baseline", (16, 1), "model.name=lipnext-tiny",
                              "train.num_workers=2", "train.steps=2",
                              "ckpt.every_steps=2"), "baseline")
    train = run_job(_overrides(tmp / "digits224", tmp / "runs", "scale", shape, "train.num_workers=2",
                               "train.steps=3", "ckpt.every_steps=3"), "train-2-ranks")
    resume = run_job(_overrides(tmp / "digits224", tmp / "runs", "scale-1rank", shape, "train.num_workers=1",
                                "train.steps=4", "ckpt.every_steps=4",
                                f"train.resume={json.dumps(train['checkpoint'])}"), "resume-1-rank")
    t0 = time.perf_counter()
    export_checkpoint(resume["checkpoint"], str(tmp / "export"))
    phases["export_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    # wide fp32 matrices: the rigorous bound from max|W^T W - I| is ~1 + 1e-4 even right after training
    # steps, above the default 1e-4 allowance; certification uses the bound it measured (sound either way).
    report = certify_job(str(tmp / "export"), str(tmp / "digits224" / "val-000000.tar"), str(tmp / "certify"),
                         CertifyConfig(eps="36/255", actors=0, batch_size=CERTIFY_IMAGES, lipschitz_tol=1e-3),
                         CertifyRuntime(progress=False))
    phases[f"certify_{report['samples']}_images_s"] = round(time.perf_counter() - t0, 1)
    certified = {k: report.get(k) for k in ("n", "samples", "results", "verification") if k in report}
    return phases, {"train_2_ranks": train, "resume_1_rank": resume}, \
        max(tiny["peak_rss_bytes"]["whole_run_high_water"]), certified


def memory_against_plan(jobs: dict[str, dict], shape: tuple[int, int]) -> tuple[dict, dict]:
    """Per job: measured peak RSS beside the plan's prediction (the "memory" section) and the comparison entry."""
    from lipnext_scale.plan import CPU_RUNTIME_BYTES

    memory, comparisons = {}, {}
    for name, run in jobs.items():
        plan = predicted(shape, run["workers"], 1, CPU_RUNTIME_BYTES)
        steps_peak = max(run["peak_rss_bytes"]["steps"])
        memory[name] = {"measured_peak_rss_bytes": run["peak_rss_bytes"],
                        "predicted_bytes_by_kind": plan["bytes"], "predicted_phases_bytes": plan["phases"],
                        "predicted_total_bytes": plan["total_bytes"],
                        "predicted_manifold_state_bytes_by_rank": plan["manifold_state_bytes_by_rank"],
                        "predicted_over_measured_steps_peak": round(plan["total_bytes"] / steps_peak, 3)}
        comparisons[f"plan_vs_measured_rss_{name}"] = comparison(
            f"`lipnext plan`'s per-rank total / the busiest rank's measured peak RSS while it steps, {name} "
            "(the plan aims at 0.8-1.2)", [plan["total_bytes"]], [steps_peak], higher_is_better=None)
    return memory, comparisons


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help=f"blocks of width x width matrices ({MODEL} has 32)")
    p.add_argument("--width", type=int, default=4096, help=f"{MODEL}'s 4096 unless a smoke run shrinks it")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 only on CPUs with native bf16 matmuls (see the module docstring)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the fp32 / bf16 matmul comparison")
    p.add_argument("--quick", action="store_true", help="smoke run: width 256, depth 1, 2 rounds (not a measurement)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.rounds = 256, 1, 2
    global PRECISION
    PRECISION = args.precision
    shape = (args.width, args.depth)
    gflops = matmul_gflops(args.width, args.rounds)
    throughput = {name: statistics.median(v) for name, v in gflops.items()}
    print(f"[bench] one-thread GFLOPS of a 196 x {args.width} x {args.width} product: {gflops}", flush=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.chdir(REPO)
    import ray

    from lipnext_scale.plan import CPU_RUNTIME_BYTES, MANIFOLD_UPDATE_WORKSPACE

    load_start = os.getloadavg()[0]
    workspace = {f"round_of_{n}": measure_manifold_workspace(n, args.width) for n in (1, 4)}
    print(f"[bench] manifold update workspace per round element: {workspace}", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        phases, jobs, baseline, certified = run_phases(shape, Path(tmp))
    ray.shutdown()
    for name, run in jobs.items():
        phases[name] = {k: run[k] for k in ("startup_s", "step_s", "step_split_s", "checkpoint_s", "run_wall_s")}
    memory, comparisons = memory_against_plan(jobs, shape)
    comparisons["matmul_bf16_vs_fp32"] = comparison(
        f"one-thread GFLOPS of a 196 x {args.width} x {args.width} product, bf16 / fp32", gflops["bf16"],
        gflops["fp32"])
    out = {
        "benchmark": f"scale smoke: {MODEL} width/patch at depth {args.depth} ({args.width} x {args.width} matrices), "
                     f"ZeRO-3 {PRECISION} on 2 CPU ranks; checkpoint, resume at 1 rank, export, certify "
                     f"{certified.get('samples')} images",
        "machine": {**machine_info(), "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]}},
        "model": {"name": MODEL, "depth": args.depth, "width": args.width, "image_size": IMAGE_SIZE,
                  "num_classes": NUM_CLASSES, "params": predicted(shape, 2, 1, CPU_RUNTIME_BYTES)["params"]},
        "settings": {"recipe": RECIPE, "micro_batch": 1, "global_batch": 2,
                     "deepspeed": "configs/deepspeed/zero3_bf16.json",
                     "precision": PRECISION, "threads_per_rank": 1, **zero_settings(), "rounds": args.rounds,
                     "quick": args.quick, f"matmul_gflops_one_thread_196x{args.width}x{args.width}": throughput},
        "comparisons": comparisons,
        "cpu_runtime_baseline_bytes": {"measured": baseline, "plan_constant": CPU_RUNTIME_BYTES,
                                       "how": "peak RSS of a lipnext-tiny (width 16) ZeRO-3 rank, 2 ranks"},
        "manifold_update_workspace": {**workspace, "plan_constant": MANIFOLD_UPDATE_WORKSPACE,
                                      "matrix_size": args.width,
                                      "how": "peak fp32 temporaries of one owner round per fp32 element of it"},
        "phases": phases,
        "memory": memory,
        "certify": certified,
    }
    from lipnext_scale.storage import atomic_write_bytes

    atomic_write_bytes(args.out, (json.dumps(out, indent=2) + "\n").encode())
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
