"""Certification throughput, side by side in one run, on the same shards:

  forward            a plain fp32 forward pass in one process (same reader, batch size, threads)
  certify 0 workers  the job in-process (float64 head, floating-point allowances, parquet, report)
  certify 0 workers, no fp allowance
                     the same with the certificate as it was before issue 15 (float64 differences of
                     fp32 logits, nothing subtracted; `reference_certify_batch` below): the cost of the
                     allowances is 1 - `fp_allowance_throughput_ratio`
  certify 1 worker   the job on one Ray actor
  certify 2 workers  the job on two Ray actors

"N workers" in these names (and the result keys) is `CertifyConfig(actors=N)`: N Ray actors, 0 in process.
`certify_ratio_vs_forward` = certified images/s of the 1-worker Ray job (its shard phase, once the actor
has loaded and verified the model: reading, forward, float64 radii, parquet writes) / forward images/s,
both on one CPU thread. `speedup_2_workers` = 2-worker / 1-worker certified images/s. Every job runs
right after a forward baseline of its own, `--repeats` times, and each ratio is the median over repeats
of job / adjacent forward, so load drifting during the run (a shared machine) cancels. The `*_cpu_time`
ratio uses CPU seconds of the working process instead of wall time. One-time costs (actor start, model
load) are in `end_to_end_*`. Results: bench/results/certify.json.

    python bench/bench_certify.py [--images 6000] [--model lipnext-tiny] [--repeats 3]
    python bench/bench_certify.py --width 256 --depth 12 --patch-size 2 --images 1200 --batch-size 64 \
        --out bench/results/certify_tiny_w256_d12_p2.json      # compute-bound: the model dominates

On a shared machine, read `machine.loadavg_*` and rerun when it was busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a bench must not write ~/.ray/auth_token
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).resolve().parent / "results" / "certify.json"
CONFIGS = (("certify_0_workers", 0), ("certify_0_workers_no_fp_allowance", 0), ("certify_1_worker", 1),
           ("certify_2_workers", 2))


def reference_certify_batch(model, images, labels, checks, lipschitz, pair_distances=None, **_ignored):
    """The per-batch certificate before issue 15 (unsound under floating-point attacks; a baseline only)."""
    import torch

    from lipnext_scale.certify import worker
    from lipnext_scale.certify.certify import certified_radius

    with torch.no_grad():
        logits = model(images.to(torch.float32))
    pred, margin, radius = certified_radius(logits.double(), pair_distances, lipschitz)
    out = {"prediction": pred, "margin": margin, "radius": radius, worker.RADIUS_EXACT: radius}
    for eps in checks.eps_list:
        out[worker.certified_column(eps)] = (pred == labels.to(pred.device)) & (radius > eps)
    return out


def make_shards(work: Path, images: int, shard_size: int) -> Path:
    """Real digits images (from `lipnext prep`), repeated under new keys to reach `images`."""
    import webdataset as wds

    from lipnext_scale.data.prep import ShardFormat, prepare

    prepare("digits", None, str(work / "digits"), ShardFormat(shard_size=1000, image_size=32), progress=False)
    samples = []
    for shard in sorted((work / "digits").glob("train-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            samples.append((s["png"], s["cls"]))
    out = work / "bench"
    out.mkdir()
    for start in range(0, images, shard_size):
        with wds.TarWriter(str(out / f"val-{start // shard_size:06d}.tar")) as sink:
            for i in range(start, min(images, start + shard_size)):
                png, cls = samples[i % len(samples)]
                sink.write({"__key__": f"img{i:07d}", "png": png, "cls": cls})
    (out / "classes.json").write_bytes((work / "digits" / "classes.json").read_bytes())
    return out


def forward_images_per_s(ckpt: str, shards: list[str], batch_size: int) -> dict:
    import torch

    from lipnext_scale.certify.data_access import iter_shard_samples
    from lipnext_scale.certify.model_loading import load_model

    torch.set_num_threads(1)
    model = load_model(ckpt).model
    n, started, cpu_started = 0, time.perf_counter(), time.process_time()
    for shard in shards:
        batch = []
        for _, image, _ in iter_shard_samples(shard):
            batch.append(image)
            if len(batch) == batch_size:
                with torch.no_grad():
                    model(torch.stack(batch)).argmax(1)
                n, batch = n + len(batch), []
        if batch:
            with torch.no_grad():
                model(torch.stack(batch)).argmax(1)
            n += len(batch)
    return {"images_per_s": n / (time.perf_counter() - started),
            "images_per_cpu_s": n / (time.process_time() - cpu_started)}


def certify_images_per_s(ckpt: str, data: str, out: Path, actors: int, batch_size: int) -> dict:
    import shutil

    from lipnext_scale.certify import worker
    from lipnext_scale.certify.job import CertifyRuntime, certify_job
    from lipnext_scale.config import CertifyConfig

    shutil.rmtree(out, ignore_errors=True)
    reference = out.name.endswith("no_fp_allowance")
    allowed = worker.certify_batch
    worker.certify_batch = reference_certify_batch if reference else allowed  # in-process only
    try:
        # fp32-initialised matrices of a deep random model can sum to a rigorous bound just above 1 + 1e-4;
        # a throughput bench certifies them anyway (the radii are divided by the bound, as always)
        report = certify_job(ckpt, data, str(out), CertifyConfig(actors=actors, batch_size=batch_size,
                                                                 lipschitz_tol=1e-3), CertifyRuntime(progress=False))
    finally:
        worker.certify_batch = allowed
    t = report["timing"]
    return {"images_per_s": t["images_per_s"], "images_per_cpu_s": t["images_per_cpu_s"],
            "end_to_end_images_per_s": report["samples"] / t["total_seconds"],
            "samples": report["samples"], "certified_accuracy": report["certified_accuracy"]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "loadavg_at_start": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", default="lipnext-tiny")
    parser.add_argument("--width", type=int, help="model override (with --depth, --patch-size)")
    parser.add_argument("--depth", type=int)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import ray
    import torch

    from lipnext_scale.certify.data_access import resolve_shards
    from lipnext_scale.config import JobConfig, config_to_dict
    from lipnext_scale.storage import atomic_write_bytes, versions
    from lipnext_scale.model import create_model
    from lipnext_scale.ckpt import save_exported

    from lipnext_scale.certify.worker import keep_freed_memory

    keep_freed_memory()  # as `lipnext certify --actors 0` does for its process (and every actor for its own)
    info = machine()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = make_shards(work, args.images, args.shard_size)
        data = str(data_dir / "val")
        cfg = config_to_dict(JobConfig())
        overrides = {k: v for k, v in (("width", args.width), ("depth", args.depth),
                                           ("patch_size", args.patch_size)) if v is not None}
        cfg["model"].update(name=args.model, **overrides)
        torch.manual_seed(0)
        save_exported(create_model(args.model, **overrides).state_dict(), cfg, str(work / "model"))
        ckpt, shards = str(work / "model"), resolve_shards(data)

        runs: dict[str, list] = {key: [] for key, _ in CONFIGS}
        for _ in range(args.repeats):
            for key, actors in CONFIGS:  # each job right after its own forward baseline: load cancels
                forward = forward_images_per_s(ckpt, shards, args.batch_size)
                job = certify_images_per_s(ckpt, data, work / key, actors, args.batch_size)
                runs[key].append({**job, "forward_images_per_s": forward["images_per_s"],
                                  "forward_images_per_cpu_s": forward["images_per_cpu_s"]})
    ray.shutdown()

    def vs_forward(key: str, field: str = "images_per_s") -> list[float]:
        return [r[field] / r[f"forward_{field}"] for r in runs[key]]

    def median(values) -> float:
        return statistics.median(list(values))

    result = {
        "benchmark": "certify",
        "certify_ratio_vs_forward": median(vs_forward("certify_1_worker")),
        # 2 vs 1 worker, each normalised by the forward pass measured just before it
        "speedup_2_workers": median(a / b for a, b in zip(vs_forward("certify_2_workers"),
                                                          vs_forward("certify_1_worker"))),
        "certify_ratio_vs_forward_cpu_time": median(vs_forward("certify_1_worker", "images_per_cpu_s")),
        "in_process_ratio_vs_forward": median(vs_forward("certify_0_workers")),
        # in-process with / without the floating-point allowances, per CPU second (both right after
        # their own forward baseline; the cost of sound certificates is 1 - this)
        "fp_allowance_throughput_ratio": median(a / b for a, b in zip(
            vs_forward("certify_0_workers", "images_per_cpu_s"),
            vs_forward("certify_0_workers_no_fp_allowance", "images_per_cpu_s"))),
        "end_to_end_ratio_vs_forward": median(r["end_to_end_images_per_s"] / r["forward_images_per_s"]
                                              for r in runs["certify_1_worker"]),
        "images_per_s_median": {"forward": median(r["forward_images_per_s"] for v in runs.values() for r in v),
                                **{k: median(r["images_per_s"] for r in v) for k, v in runs.items()}},
        "all_runs": runs,
        "setup": {"model": args.model, "model_overrides": overrides, "images": args.images, "shards": len(shards),
                  "batch_size": args.batch_size,
                  "threads_per_worker": 1, "repeats": args.repeats, "device": "cpu",
                  "data": "digits train images (lipnext prep, 32x32 PNG) repeated under new keys"},
        "targets": {"certify_ratio_vs_forward": ">= 0.9", "fp_allowance_throughput_ratio": ">= 0.9"},
        "machine": {**info, "loadavg_at_end": list(os.getloadavg())},
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())
    print(json.dumps({k: v for k, v in result.items() if k not in ("all_runs", "versions", "machine")}, indent=2))


if __name__ == "__main__":
    main()
