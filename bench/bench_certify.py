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
Each round runs two triples back to back, (forward, certify 0 workers, certify 0 workers no fp allowance) and
(forward, certify 1 worker, certify 2 workers), in reverse order on odd rounds, each with a forward pass of its
own; every comparison is the median over rounds of that round's ratio of neighbours (bench/paired.py), with
min, max and the per-round ratios under "comparisons":

  certify_1_worker_vs_forward           1-worker Ray job's shard phase (once the actor has loaded and verified
                                        the model: reading, forward, float64 radii, parquet writes) / forward,
                                        images/s, both on one CPU thread (`certify_ratio_vs_forward`, >= 0.9)
  certify_1_worker_vs_forward_cpu_time  the same per CPU second of the working process
  certify_1_worker_end_to_end_vs_forward  the same with one-time costs (actor start, model load)
  certify_in_process_vs_forward         the job in process / forward, images/s
  fp_allowance_on_vs_off                in process with / without the floating-point allowances, images per CPU
                                        second (the cost of sound certificates is 1 - this; >= 0.9)
  certify_2_workers_vs_1_worker         2 / 1 Ray workers, images/s (`speedup_2_workers`)

The older top-level keys hold the same paired medians. Results: bench/results/certify.json.

    python bench/bench_certify.py [--images 6000] [--model lipnext-tiny] [--rounds 3]
    python bench/bench_certify.py --width 256 --depth 12 --patch-size 2 --images 1200 --batch-size 64 \
        --out bench/results/certify_tiny_w256_d12_p2.json      # compute-bound: the model dominates
    python bench/bench_certify.py --quick --out /tmp/certify.json   # smoke run: 200 images, 2 rounds

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

from paired import comparison, paired_order  # bench/paired.py (this script's directory is on sys.path)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a bench must not write ~/.ray/auth_token
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).resolve().parent / "results" / "certify.json"
THREADS = 1  # torch threads of the forward pass and of every certifying process
CONFIGS = {"certify_0_workers": 0, "certify_0_workers_no_fp_allowance": 0, "certify_1_worker": 1,
           "certify_2_workers": 2}  # name -> Ray actors (0: in process)
# each round: these triples, every job next to the ones it is compared with
TRIPLES = (("forward", "certify_0_workers", "certify_0_workers_no_fp_allowance"),
           ("forward", "certify_1_worker", "certify_2_workers"))
# name -> (ours, its field, alternative, its field, what, target); a field of "forward" is its own figure
COMPARISONS = {
    "certify_1_worker_vs_forward": (
        "certify_1_worker", "images_per_s", "forward", "images_per_s",
        "1-worker Ray certification (shard phase) / plain fp32 forward, images/s on one thread", 0.9),
    "certify_1_worker_vs_forward_cpu_time": (
        "certify_1_worker", "images_per_cpu_s", "forward", "images_per_cpu_s",
        "1-worker Ray certification (shard phase) / plain fp32 forward, images per CPU second", None),
    "certify_1_worker_end_to_end_vs_forward": (
        "certify_1_worker", "end_to_end_images_per_s", "forward", "images_per_s",
        "1-worker Ray certification incl. actor start and model load / plain fp32 forward, images/s", None),
    "certify_in_process_vs_forward": (
        "certify_0_workers", "images_per_s", "forward", "images_per_s",
        "in-process certification / plain fp32 forward, images/s", None),
    "fp_allowance_on_vs_off": (
        "certify_0_workers", "images_per_cpu_s", "certify_0_workers_no_fp_allowance", "images_per_cpu_s",
        "in-process certification with / without the floating-point allowances, images per CPU second", 0.9),
    "certify_2_workers_vs_1_worker": (
        "certify_2_workers", "images_per_s", "certify_1_worker", "images_per_s",
        "2-worker / 1-worker Ray certification (shard phase), images/s", None),
}
# existing top-level keys -> the comparison whose paired median they now hold
LEGACY_KEYS = {"certify_ratio_vs_forward": "certify_1_worker_vs_forward",
               "speedup_2_workers": "certify_2_workers_vs_1_worker",
               "certify_ratio_vs_forward_cpu_time": "certify_1_worker_vs_forward_cpu_time",
               "in_process_ratio_vs_forward": "certify_in_process_vs_forward",
               "fp_allowance_throughput_ratio": "fp_allowance_on_vs_off",
               "end_to_end_ratio_vs_forward": "certify_1_worker_end_to_end_vs_forward"}


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

    torch.set_num_threads(THREADS)
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
                                                                 lipschitz_tol=1e-3),
                             CertifyRuntime(progress=False, threads_per_worker=THREADS))
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


def run_round(round_index: int, ckpt: str, data: str, work: Path, batch_size: int) -> dict[str, dict]:
    """One round: each triple back to back (reversed on odd rounds); name -> its figures, the forward of the
    triple a job ran in beside each job ("forward_images_per_s", "forward_images_per_cpu_s")."""
    from lipnext_scale.certify.data_access import resolve_shards

    shards, out = resolve_shards(data), {}
    for triple in TRIPLES:
        measured = {}
        for name in paired_order(round_index, triple):
            measured[name] = (forward_images_per_s(ckpt, shards, batch_size) if name == "forward" else
                              certify_images_per_s(ckpt, data, work / name, CONFIGS[name], batch_size))
        forward = measured.pop("forward")
        for name, job in measured.items():
            out[name] = {**job, "forward_images_per_s": forward["images_per_s"],
                         "forward_images_per_cpu_s": forward["images_per_cpu_s"]}
    return out


def comparisons_of(runs: dict[str, list[dict]], model: str) -> dict:
    """The paired comparisons from every round's runs (a job's own triple's forward for "forward"); `model`
    names the model certified in each "what"."""
    def figures(name: str, field: str, partner: str) -> list[float]:
        return [r[f"forward_{field}"] for r in runs[partner]] if name == "forward" else [r[field] for r in runs[name]]

    return {key: comparison(f"{what}, {model}", figures(ours, f_ours, alt), figures(alt, f_alt, ours), target=target)
            for key, (ours, f_ours, alt, f_alt, what, target) in COMPARISONS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", default="lipnext-tiny")
    parser.add_argument("--width", type=int, help="model override (with --depth, --patch-size)")
    parser.add_argument("--depth", type=int)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 images in shards of 100, batch 32, "
                                                             "2 rounds (not a measurement)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.images, args.shard_size, args.batch_size, args.rounds = 200, 100, 32, 2

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
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # a private instance
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

        runs: dict[str, list] = {key: [] for key in CONFIGS}
        for r in range(args.rounds):
            for name, figures in run_round(r, ckpt, data, work, args.batch_size).items():
                runs[name].append(figures)
    ray.shutdown()

    model = ", ".join([args.model, *(f"{k.replace('_', ' ')} {v}" for k, v in overrides.items())])
    comparisons = comparisons_of(runs, model)

    def median(values) -> float:
        return statistics.median(list(values))

    result = {
        "benchmark": "certify",
        **{key: comparisons[name]["median"] for key, name in LEGACY_KEYS.items()},
        "comparisons": comparisons,
        "images_per_s_median": {"forward": median(r["forward_images_per_s"] for v in runs.values() for r in v),
                                **{k: median(r["images_per_s"] for r in v) for k, v in runs.items()}},
        "all_runs": runs,
        "setup": {"model": args.model, "model_overrides": overrides, "images": args.images, "shards": len(shards),
                  "batch_size": args.batch_size, "threads_per_worker": THREADS,
                  "rounds": args.rounds, "quick": args.quick, "device": "cpu",
                  "data": "digits train images (lipnext prep, 32x32 PNG) repeated under new keys"},
        "targets": {key: f">= {COMPARISONS[name][-1]}" for key, name in LEGACY_KEYS.items()
                    if COMPARISONS[name][-1] is not None},
        "notes": [", ".join(f"{k} = comparisons.{v}.median" for k, v in LEGACY_KEYS.items())
                  + " (paired per-round medians); images_per_s_median is each variant's own median (not paired)"],
        "machine": {**info, "loadavg_at_end": list(os.getloadavg())},
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())
    print(json.dumps({k: v for k, v in result.items() if k not in ("all_runs", "versions", "machine")}, indent=2))


if __name__ == "__main__":
    main()
