"""Manifold optimizer benchmarks, measured side by side in one run; writes bench/results/optim.json.

1. Retractions: time and orthogonality error per method for d in {256, 512, 1024, 2048}, fp32 and bf16
   inputs (square d x d point, a tangent step of Frobenius norm 0.5).
2. Training step of one LipNeXt (width 512): ours (ManifoldOptimizer) vs plain AdamW ignoring the
   constraint vs the same model with geotorch's orthogonal parametrization + AdamW. Variants are timed
   round-robin (one step each per round) so machine noise hits them alike; medians are compared.
3. Retraction phase (ShardedManifoldStep.step: gather + retract + scatter) under real DeepSpeed ZeRO-3 on
   CPU with 2 ranks vs 1 rank, one BLAS thread per rank (each rank is one core's worth of work).

Run: python bench/bench_optim.py [--quick]. The ZeRO-3 part re-invokes this file with --zero3-worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "optim.json"


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------- 1. retractions

def bench_retractions(sizes: list[int]) -> list[dict]:
    """Per d, every (input dtype, method) pair is timed once per round, round-robin; medians reported."""
    from lipnext_scale.optim import RETRACTIONS, orthogonality_error, retract, riemannian_grad

    rows = []
    for d in sizes:
        gen = torch.Generator().manual_seed(d)
        x = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
        t = riemannian_grad(x, torch.randn(d, d, generator=gen))
        t = 0.5 * t / t.norm()
        cases = [(dtype, m) for dtype in (torch.float32, torch.bfloat16) for m in RETRACTIONS]
        times: dict = {c: [] for c in cases}
        rounds = 5 if d <= 512 else (3 if d <= 1024 else 2)
        for r in range(rounds + 1):
            for dtype, method in cases:
                xi, ti = x.to(dtype), t.to(dtype)
                start = time.perf_counter()
                retract(xi, method, tangent=ti)
                if r:  # round 0 warms up
                    times[(dtype, method)].append(time.perf_counter() - start)
        for dtype, method in cases:
            stats: dict = {}
            y = retract(x.to(dtype), method, tangent=t.to(dtype), stats=stats)
            rows.append({"d": d, "input_dtype": str(dtype).replace("torch.", ""), "method": method,
                         "seconds": statistics.median(times[(dtype, method)]), "rounds": rounds,
                         "orthogonality_error": orthogonality_error(y), "ns_fallbacks": stats.get("ns_fallbacks", 0)})
            print(f"retraction d={d:5d} {rows[-1]['input_dtype']:8s} {method:9s} {rows[-1]['seconds'] * 1e3:9.2f} ms"
                  f"  err {rows[-1]['orthogonality_error']:.2e}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- 2. train step

def _model(width: int, depth: int):
    from lipnext_scale.model import create_model

    torch.manual_seed(0)
    return create_model("lipnext-cifar-s", width=width, depth=depth)


def bench_train_step(width: int, depth: int, batch: int, rounds: int, retractions: list[str]) -> dict:
    """One training step (forward, backward, optimizer) of the same LipNeXt per variant, round-robin."""
    import geotorch

    from lipnext_scale.config import OptimConfig
    from lipnext_scale.model.layers import OrthogonalProjection
    from lipnext_scale.optim import ManifoldOptimizer

    variants = {}
    for method in retractions:
        model = _model(width, depth)
        cfg = OptimConfig(lr=0.02, retraction=method, total_steps=10_000, reortho_every=0)
        variants[f"ours_{method}"] = (model, ManifoldOptimizer(model, cfg))
    adamw = _model(width, depth)
    variants["adamw"] = (adamw, torch.optim.AdamW(adamw.parameters(), lr=1e-3))
    geo = _model(width, depth)
    for m in geo.modules():
        if isinstance(m, OrthogonalProjection):
            geotorch.orthogonal(m, "weight")
    variants["geotorch"] = (geo, torch.optim.AdamW(geo.parameters(), lr=1e-3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

    step_times = {k: [] for k in variants}
    opt_times = {k: [] for k in variants}
    for r in range(rounds + 1):
        for name, (model, opt) in variants.items():
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            mid = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            if r:  # round 0 warms up
                step_times[name].append(end - start)
                opt_times[name].append(end - mid)
    med = {k: statistics.median(v) for k, v in step_times.items()}
    out = {"width": width, "depth": depth, "batch": batch, "image_size": 32, "rounds": rounds,
           "median_step_seconds": med,
           "median_optimizer_seconds": {k: statistics.median(v) for k, v in opt_times.items()},
           "ratios": {k: {"vs_adamw": med[k] / med["adamw"], "vs_geotorch": med[k] / med["geotorch"]}
                      for k in variants if k.startswith("ours_")},
           "ns_stats": {k: dict(opt.ns_stats) for k, (_, opt) in variants.items() if k.startswith("ours_")}}
    print("train step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()), flush=True)
    for k, v in out["ratios"].items():
        print(f"  {k}: vs adamw {v['vs_adamw']:.3f}, vs geotorch {v['vs_geotorch']:.3f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------- 3. ZeRO-3 ranks

ZERO3_MODEL = dict(width=512, depth=4, image_size=8)


def zero3_worker(out: Path, steps: int) -> None:
    import deepspeed

    from lipnext_scale.config import OptimConfig
    from lipnext_scale.model import create_model
    from lipnext_scale.optim import ShardedManifoldStep, build_zero3_optimizers

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    model = create_model("lipnext-cifar-s", **ZERO3_MODEL)
    cfg = OptimConfig(lr=0.02, retraction="polar_ns", total_steps=10_000, reortho_every=0)
    client, _ = build_zero3_optimizers(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, config={
        "train_micro_batch_size_per_gpu": 4 // world, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True, "bf16": {"enabled": True}, "steps_per_print": 10 ** 9})
    manifold = ShardedManifoldStep(engine, model, cfg)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    per = 4 // world
    phase, compute = [], []
    for _ in range(steps):
        loss = F.cross_entropy(engine(x[rank * per:(rank + 1) * per].bfloat16()).float(), y[rank * per:(rank + 1) * per])
        engine.backward(loss)
        torch.distributed.barrier()  # time the phase itself, not waiting for a slower rank's backward
        manifold.step()
        phase.append(manifold.stats["seconds"])
        compute.append(manifold.stats["compute_seconds"])
        engine.step()
    (out / f"zero3_ws{world}_rank{rank}.json").write_text(json.dumps(
        {"phase_seconds": phase, "compute_seconds": compute, "owned": [s.name for s in manifold.owned]}))


_MATMUL_PROBE = ("import time, torch; torch.set_num_threads(1); a = torch.randn(1024, 512); a.T @ a; "
                 "t = time.perf_counter(); [a.T @ a for _ in range(30)]; print(time.perf_counter() - t)")


def parallel_capacity_probe() -> float:
    """Control for the 2-rank ratio: wall time of two concurrent single-thread matmul processes over one alone.
    0.5 = two free cores; 1.0 = the machine gives two processes no more than one core (shared or SMT)."""
    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _MATMUL_PROBE], stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    alone = statistics.median(run(1) for _ in range(3))
    together = statistics.median(run(2) for _ in range(3))
    return together / (2 * alone)  # time per unit of work, two processes vs one


def bench_zero3(steps: int) -> dict:
    res = {"parallel_capacity_probe_before": parallel_capacity_probe()}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            procs = [subprocess.Popen(
                [sys.executable, __file__, "--zero3-worker", tmp, "--steps", str(steps)],
                env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(world)]
            for p in procs:
                _, err = p.communicate(timeout=900)
                if p.returncode:
                    raise RuntimeError(f"ZeRO-3 bench worker (world {world}) failed:\n{err[-3000:]}")
            ranks = [json.loads((Path(tmp) / f"zero3_ws{world}_rank{r}.json").read_text()) for r in range(world)]
            # a step's phase lasts as long as its slowest rank; skip the first (warm-up) step
            per_step = [max(r["phase_seconds"][i] for r in ranks) for i in range(1, steps)]
            res[f"world_{world}"] = {
                "median_phase_seconds": statistics.median(per_step),
                "median_compute_seconds_per_rank": [statistics.median(r["compute_seconds"][1:]) for r in ranks],
                "owned": [r["owned"] for r in ranks]}
            print(f"ZeRO-3 retraction phase, {world} rank(s): {res[f'world_{world}']['median_phase_seconds'] * 1e3:.1f} ms",
                  flush=True)
    res["parallel_capacity_probe_after"] = parallel_capacity_probe()
    res["retraction_ratio_2rank_vs_1rank"] = (res["world_2"]["median_phase_seconds"]
                                              / res["world_1"]["median_phase_seconds"])
    print(f"ZeRO-3 2-rank/1-rank {res['retraction_ratio_2rank_vs_1rank']:.3f}; control (2 matmul processes "
          f"vs 1, per unit of work): {res['parallel_capacity_probe_before']:.3f} before, "
          f"{res['parallel_capacity_probe_after']:.3f} after", flush=True)
    res["model"] = ZERO3_MODEL
    res["threads_per_rank"] = 1
    return res


# ---------------------------------------------------------------------------------------- main

def machine_info() -> dict:
    import deepspeed
    import geotorch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "geotorch": getattr(geotorch, "__version__", "unknown"), "torch_threads": torch.get_num_threads(),
            # the machine may be shared: ratios are taken side by side, absolute times depend on this
            "load_average_at_start": list(os.getloadavg())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke run)")
    ap.add_argument("--zero3-worker", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.zero3_worker:
        zero3_worker(Path(args.zero3_worker), args.steps)
        return
    sizes = [256, 512] if args.quick else [256, 512, 1024, 2048]
    result = {"machine": machine_info(), "retractions": bench_retractions(sizes)}
    from lipnext_scale.optim import RETRACTIONS

    result["train_step"] = bench_train_step(512, 1 if args.quick else 2, 16 if args.quick else 32,
                                            2 if args.quick else 6, ["polar_ns"] if args.quick else list(RETRACTIONS))
    result["zero3"] = bench_zero3(3 if args.quick else args.steps)
    default = result["train_step"]["ratios"]["ours_polar_ns"]  # the default retraction (OptimConfig)
    result["step_ratio_vs_adamw"] = default["vs_adamw"]
    result["step_ratio_vs_geotorch"] = default["vs_geotorch"]
    result["retraction_ratio_2rank_vs_1rank"] = result["zero3"]["retraction_ratio_2rank_vs_1rank"]
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["targets"] = {"step_ratio_vs_adamw": 1.3, "step_ratio_vs_geotorch": 0.5,
                         "retraction_ratio_2rank_vs_1rank": 0.65}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)  # never a half-written result
    print(json.dumps({k: result[k] for k in ("step_ratio_vs_adamw", "step_ratio_vs_geotorch",
                                             "retraction_ratio_2rank_vs_1rank")}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
