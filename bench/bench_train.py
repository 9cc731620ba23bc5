"""CPU training benchmark: step-time split of lipnext-tiny, ZeRO-3 on 2 workers vs a single process,
checkpoint save and load times, the stall a checkpoint causes with asynchronous vs synchronous upload,
and the lag of certification during training. Writes bench/results/train.json.

Every variant runs the real training path (`run_training`: Ray Train + DeepSpeed ZeRO-3, digits shards,
the demo recipe) in one invocation, side by side, on a private local Ray instance:

  single-1thread        1 worker,  1 intra-op thread
  single-2threads       1 worker,  2 intra-op threads (the whole 2-core machine in one process)
  zero3-2workers        2 workers, 1 thread each (data parallel, ZeRO-3 partitioned)
  zero3-2workers-sync   the same with ckpt.upload=sync (the others upload asynchronously, the default)
  zero3-2workers-w512 (-sync)  the same two with model.width=512, model.depth=4 (2.1 M parameters; each
                        run records its checkpoint_bytes)
  zero3-2workers-w1024 (-sync) model.width=1024, model.depth=4 (8.4 M parameters; 30
                        steps), the largest model this bench uses
  certify-lag           1 worker; every checkpoint certified while training runs (one Ray actor)

The step-split variants run with certify.during_training=false, so certification does not compete for
the cores. The variants that are compared run `--rounds` times: each round runs them back to back (reversed
on odd rounds: single-2threads, zero3-2workers, its -sync, the w512 pair, the w1024 pair), and every comparison
is the median over rounds of that round's ratio (bench/paired.py), under "comparisons":

  zero3_2workers_vs_single_2threads      images/s, ZeRO-3 on 2 workers / one process with 2 threads
  checkpoint_stall_async_vs_sync_tiny    the loop's checkpoint phase per save (what a step waits for),
  checkpoint_stall_async_vs_sync_w512    async / sync upload, at each model size
  checkpoint_stall_async_vs_sync_w1024

single-1thread and certify-lag run once. `checkpoint_stall_ratio_async_vs_sync` is the paired median at the
largest checkpoint measured; `results` holds per variant the median over its rounds of each figure (every
round's in `per_round`). Validation lag: a checkpoint's meta.json time (written at the step) to its
certification report being written (`{run}/certify/step_X/status.json`).

The split comes from the loop's own phase timers (TensorBoard `time/*` scalars: data, forward,
backward, retraction, optimizer, checkpoint); the first logging window is warm-up and is dropped.
Checkpoints are written every `--log-every` steps, so each later window holds exactly one save.
Load times are measured in this process on the final checkpoint: `load_train_state` (what resume
reads) and `consolidate_checkpoint` (what export/certify read).

    python bench/bench_train.py [--steps 60] [--log-every 10] [--rounds 3] [--out bench/results/train.json]
    python bench/bench_train.py --quick --out /tmp/train.json    # smoke run: 15 steps, 2 rounds, 4 variants

Run it with RAY_AUTH_MODE=disabled (or HOME pointed elsewhere) on shared machines: a new local Ray
instance otherwise creates ~/.ray/auth_token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from paired import comparison, paired_order  # bench/paired.py (this script's directory is on sys.path)

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "single-1thread": {"train.num_workers": 1, "train.cpus_per_worker": 1},
    "single-2threads": {"train.num_workers": 1, "train.cpus_per_worker": 2},
    "zero3-2workers": {"train.num_workers": 2, "train.cpus_per_worker": 1},
    "zero3-2workers-sync": {"train.num_workers": 2, "train.cpus_per_worker": 1, "ckpt.upload": "sync"},
    "zero3-2workers-w512": {"train.num_workers": 2, "train.cpus_per_worker": 1, "model.width": 512, "model.depth": 4},
    "zero3-2workers-w512-sync": {"train.num_workers": 2, "train.cpus_per_worker": 1, "model.width": 512,
                                 "model.depth": 4, "ckpt.upload": "sync"},
    # 8.4 M parameters, the largest checkpoint: where the bytes, not the fixed costs, make the stall (30 steps)
    "zero3-2workers-w1024": {"train.num_workers": 2, "train.cpus_per_worker": 1, "model.width": 1024,
                             "model.depth": 4, "train.steps": 30},
    "zero3-2workers-w1024-sync": {"train.num_workers": 2, "train.cpus_per_worker": 1, "model.width": 1024,
                                  "model.depth": 4, "train.steps": 30, "ckpt.upload": "sync"},
    "certify-lag": {"train.num_workers": 1, "train.cpus_per_worker": 1, "certify.during_training": "true",
                    "certify.actors": 1, "train.steps": 240, "ckpt.every_steps": 80,
                    "certify.max_waiting": 0},  # every checkpoint certified: the lag of each
}
LAG_VARIANT = "certify-lag"
# run back to back in every round (each next to the ones it is compared with); the other variants run once
ROUND_ORDER = ("single-2threads", "zero3-2workers", "zero3-2workers-sync", "zero3-2workers-w512",
               "zero3-2workers-w512-sync", "zero3-2workers-w1024", "zero3-2workers-w1024-sync")
THROUGHPUT = {"zero3_2workers_vs_single_2threads": ("zero3-2workers", "single-2threads")}
STALLS = {"checkpoint_stall_async_vs_sync_tiny": ("zero3-2workers", "zero3-2workers-sync"),
          "checkpoint_stall_async_vs_sync_w512": ("zero3-2workers-w512", "zero3-2workers-w512-sync"),
          "checkpoint_stall_async_vs_sync_w1024": ("zero3-2workers-w1024", "zero3-2workers-w1024-sync")}
QUICK_VARIANTS = ("single-2threads", "zero3-2workers", "zero3-2workers-sync", LAG_VARIANT)
STEP_PHASES = ("data", "forward", "backward", "retraction", "optimizer")


def machine_info() -> dict:
    import deepspeed
    import ray
    import torch

    cpu_model = ""
    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"platform": platform.platform(), "cpu": cpu_model, "cpu_count": os.cpu_count(),
            "memory_gib": round(mem_gib, 1), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "ray": ray.__version__}


def read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def summarise(scalars: dict[str, dict[int, float]], log_every: int, batch_size: int) -> dict:
    """Mean per-step phase times over the logging windows after the first, and checkpoint save time."""
    windows = sorted(scalars["time/data"])[1:]
    if not windows:
        raise SystemExit("bench: need at least two logging windows; raise --steps")
    per_step = {p: statistics.mean(scalars[f"time/{p}"][w] for w in windows) / log_every for p in STEP_PHASES}
    step_s = sum(per_step.values())
    saves = [scalars["time/checkpoint"][w] for w in windows if scalars["time/checkpoint"][w] > 0]
    return {
        "step_ms": round(1e3 * step_s, 2),
        "split_ms": {p: round(1e3 * t, 2) for p, t in per_step.items()},
        "split_share": {p: round(t / step_s, 3) for p, t in per_step.items()},
        "images_per_s": round(statistics.mean(scalars["train/images_per_s"][w] for w in windows), 1),
        "checkpoint_save_s": round(statistics.mean(saves), 3) if saves else None,
        "windows": len(windows), "per_worker_batch": batch_size,
    }


def time_loads(ckpt: str, repeats: int = 3) -> dict:
    from lipnext_scale.ckpt import consolidate_checkpoint, load_train_state

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(ckpt)
            times.append(time.perf_counter() - t0)
        return round(min(times), 4)

    size = sum(p.stat().st_size for p in Path(ckpt).rglob("*") if p.is_file())
    return {"load_train_state_s": best(load_train_state), "consolidate_s": best(consolidate_checkpoint),
            "checkpoint_bytes": size}


def validation_lags(run_dir: Path) -> dict:
    """Per certified checkpoint: checkpoint written -> its report available, and the certification job's own time."""
    lags, job = {}, {}
    for status in sorted((run_dir / "certify").glob("step_*/status.json")):
        record = json.loads(status.read_text())
        if record.get("state") == "done" and record.get("lag_s") is not None:
            step = int(status.parent.name[5:])
            lags[step] = round(record["lag_s"], 2)
            job[step] = round(record["finished"] - record["started"], 2)
    if not lags:
        raise SystemExit(f"bench: no checkpoint of {run_dir} was certified")
    return {"validation_lag_s": lags, "validation_lag_mean_s": round(statistics.mean(lags.values()), 2),
            "validation_lag_max_s": max(lags.values()), "certification_task_s": job}


def model_of(cfg) -> dict:
    """The model a run trained, from its config (the registry entry with the run's overrides)."""
    from lipnext_scale.model import get_spec

    spec = get_spec(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
                    **cfg.model.overrides())
    return {"name": cfg.model.name, "width": spec.width, "depth": spec.depth, "params": spec.num_params()}


def run_variant(name: str, settings: dict, data_dir: Path, storage: Path, steps: int, log_every: int) -> dict:
    """One training run of a variant; `name` is also its run's name (unique per round: no run resumes another)."""
    from lipnext_scale.demo import DEMO_CONFIG
    from lipnext_scale.train.cli import build_train_config, dataset_overrides, toml_string
    from lipnext_scale.train.trainer import run_training

    overrides = [*dataset_overrides(str(data_dir)), f"train.storage={toml_string(str(storage))}",
                 f"train.name={name}", f"train.steps={steps}", "optim.warmup_steps=0",
                 f"train.log_every={log_every}", f"ckpt.every_steps={log_every}", f"ckpt.keep_last={steps}",
                 "train.eval_every=0", "train.progress_bar=false", "certify.during_training=false",
                 *(f"{k}={v}" for k, v in settings.items())]
    cfg = build_train_config(DEMO_CONFIG, overrides)
    t0 = time.perf_counter()
    result = run_training(cfg)
    wall = time.perf_counter() - t0
    out = summarise(read_scalars(Path(result["run_dir"]) / "tensorboard"), log_every, cfg.data.batch_size)
    out.update({"model": model_of(cfg), "steps": cfg.train.steps,
                "workers": cfg.train.num_workers, "threads_per_worker": cfg.train.cpus_per_worker,
                "precision": cfg.train.precision, "upload": cfg.ckpt.upload, "run_wall_s": round(wall, 1),
                **time_loads(result["checkpoint"])})
    if cfg.certify.during_training:
        out.update(validation_lags(Path(result["run_dir"])))
    print(f"[bench] {name}: {json.dumps(out)}", flush=True)
    return out



def median_over_rounds(runs: list[dict]) -> dict:
    """One variant's figures: the median over its rounds of every number (nested dicts alike), other values
    from the first round; every round's own figures in "per_round" when it ran more than once."""
    def merge(values: list):
        if all(v == values[0] for v in values):  # settings and sizes: kept as they are (ints stay ints)
            return values[0]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return round(statistics.median(values), 4)
        if all(isinstance(v, dict) for v in values):
            return {k: merge([v[k] for v in values if k in v]) for k in values[0]}
        return values[0]

    out = merge(runs)
    out["rounds"] = len(runs)
    if len(runs) > 1:
        out["per_round"] = runs
    return out


def _model_label(run: dict) -> str:
    m = run["model"]
    return f"{m['name']} width {m['width']}, depth {m['depth']} ({m['params'] / 1e6:.2f} M parameters)"


def comparisons_of(runs: dict[str, list[dict]]) -> dict:
    """The paired comparisons whose both variants ran, from each round's runs."""
    out = {}
    for key, (ours, alt) in THROUGHPUT.items():
        if ours in runs and alt in runs:
            out[key] = comparison(f"{ours} / {alt} ({runs[ours][0]['workers']} x {runs[ours][0]['threads_per_worker']}"
                                  f" vs {runs[alt][0]['workers']} x {runs[alt][0]['threads_per_worker']} threads), "
                                  f"training images/s, {_model_label(runs[ours][0])}",
                                  [r["images_per_s"] for r in runs[ours]], [r["images_per_s"] for r in runs[alt]])
    for key, (ours, alt) in STALLS.items():
        if ours in runs and alt in runs:
            a, b = [r["checkpoint_save_s"] for r in runs[ours]], [r["checkpoint_save_s"] for r in runs[alt]]
            if None in a or None in b:
                raise SystemExit(f"bench: {ours} or {alt} saved no checkpoint after warm-up; raise --steps")
            mb = statistics.median(r["checkpoint_bytes"] for r in runs[ours]) / 1e6
            out[key] = comparison(f"async / sync upload, the loop's checkpoint phase per save (the step's stall), "
                                  f"{_model_label(runs[ours][0])}, {mb:.1f} MB checkpoint", a, b,
                                  higher_is_better=False)
    return out


def derived(results: dict, comparisons: dict) -> dict:
    """The headline numbers: checkpoint stall async/sync at every model size (the largest checkpoint's paired
    median as the headline), and certification lag during training."""
    out: dict = {}
    stalls = sorted(((results[ours]["checkpoint_bytes"], key, ours, alt) for key, (ours, alt) in STALLS.items()
                     if key in comparisons))
    for size, key, ours, alt in stalls:  # the largest last
        c = comparisons[key]
        out["checkpoint_stall_ratio_async_vs_sync"] = c["median"]
        out.setdefault("checkpoint_stall_s", {})[ours] = {
            "async": results[ours]["checkpoint_save_s"], "sync": results[alt]["checkpoint_save_s"],
            "ratio": c["median"], "ratio_min": c["min"], "ratio_max": c["max"], "rounds": c["rounds"],
            "model": _model_label(results[ours]), "checkpoint_bytes": size}
    if LAG_VARIANT in results:
        r = results[LAG_VARIANT]
        out["validation_lag_s"] = {"mean": r["validation_lag_mean_s"], "max": r["validation_lag_max_s"],
                                   "per_checkpoint": r["validation_lag_s"]}
    return out


def quick_settings(settings: dict, steps: int) -> dict:
    """A variant's settings for a smoke run: its own step count and checkpoint interval become `steps`."""
    return {k: (steps if k in ("train.steps", "ckpt.every_steps") else v) for k, v in settings.items()}


def run_all(names: list[str], args, work: Path) -> dict[str, list[dict]]:
    """Every variant's runs: those outside ROUND_ORDER once, then `args.rounds` rounds of the others."""
    def run(name: str, label: str) -> dict:
        settings = quick_settings(VARIANTS[name], args.steps) if args.quick else VARIANTS[name]
        return run_variant(label, settings, work / "digits", work / "runs", args.steps, args.log_every)

    runs: dict[str, list[dict]] = {}
    for name in names:
        if name not in ROUND_ORDER:
            runs[name] = [run(name, name)]
    paired = [n for n in ROUND_ORDER if n in names]
    for r in range(args.rounds):
        for name in paired_order(r, paired):
            runs.setdefault(name, []).append(run(name, f"{name}-round{r}"))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the compared variants")
    p.add_argument("--variants", help=f"subset of {','.join(VARIANTS)} (default: all; with --quick: "
                                      f"{','.join(QUICK_VARIANTS)})")
    p.add_argument("--quick", action="store_true", help="smoke run: 15 steps, a checkpoint every 5, 2 rounds "
                                                        "(not a measurement)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.log_every, args.rounds = 15, 5, 2
    names = (args.variants.split(",") if args.variants else list(QUICK_VARIANTS if args.quick else VARIANTS))
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a bench must not write ~/.ray/auth_token

    import ray

    from lipnext_scale.demo import ensure_digits

    load_before = os.getloadavg()  # other work on the machine inflates every variant alike
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        ensure_digits(work / "digits")
        runs = run_all(names, args, work)
    finally:
        ray.shutdown()
    comparisons = comparisons_of(runs)
    results = {name: median_over_rounds(v) for name, v in runs.items()}
    machine = machine_info()
    report = {
        "benchmark": f"train step-time split, {runs[names[0]][0]['model']['name']} on digits (demo recipe), CPU",
        "machine": {**machine, "load_average_1m": {"start": round(load_before[0], 2),
                                                   "end": round(os.getloadavg()[0], 2)},
                    "uptime_load_1_5_15": {"start": [round(v, 2) for v in load_before],
                                           "end": [round(v, 2) for v in os.getloadavg()]}},
        "settings": {"steps": args.steps, "log_every": args.log_every, "rounds": args.rounds, "quick": args.quick,
                     "variants": names, "config": "configs/train/demo.toml"},
        **derived(results, comparisons),
        "comparisons": comparisons,
        "results": results,
        "notes": [
            "split_ms: wall ms per optimizer step by phase, from the loop's timers, mean over the logging "
            "windows after the first (warm-up); checkpoint_save_s: what one save stalls the loop (its "
            "checkpoint phase): with upload=sync incl. Ray Train's copy to storage and its hand-over to the "
            "controller, with upload=async only writing the staging copy and handing it to the upload thread.",
            "results: per variant, the median over its rounds of each figure (every round in per_round); "
            "comparisons: medians of per-round paired ratios, with min, max and rounds.",
            "checkpoint_stall_ratio_async_vs_sync: the paired median at the largest checkpoint measured; "
            "checkpoint_stall_s gives every model with its measured checkpoint_bytes.",
            "validation_lag_s (certify-lag): checkpoint meta.json time -> its certification report written, "
            "one certification at a time (Ray Train runs one validation task at a time), one Ray actor on the "
            "second core beside 1 training worker; it includes the task's and the actor's process start-up "
            "(certification_task_s is the task from start to report).",
            "images_per_s counts all workers; single-2threads uses the whole machine in one process.",
        ],
    }
    from lipnext_scale.storage import atomic_write_bytes

    atomic_write_bytes(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(json.dumps({"comparisons": {k: {f: c[f] for f in ("median", "min", "max", "rounds")}
                                      for k, c in comparisons.items()}}, indent=2))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
