"""One-command GPU benchmark (issue 14): is a LipNeXt training step near the hardware's limit?

    python bench/bench_gpu.py                 # on one H100/H200: <= 8 minutes, results in bench/results/gpu.json
    python bench/bench_gpu.py --smoke         # CPU: a tiny version of every part (CI runs it so it cannot rot)

Parts, each in its own process with a timeout (a hang or an out-of-memory ends that part only), results
written after each part so a part that runs out of time loses nothing before it:

  train_step   lipnext-1b (and 2b when it fits) bf16 forward + EMMA loss + backward at several micro-batches:
               images/s, achieved TFLOP/s (3 x forward FLOPs per image: forward, input and weight grads),
               MFU against the device's dense bf16 peak, peak memory.
  manifold     the manifold optimizer's step over all of the model's matrices (fp32 masters, Adam moments,
               FastExp + polish, Lookahead) on one GPU; its share of a step on 1 GPU (measured), and a
               PROJECTION to 8/32/64 GPUs under its own `_projected` key (each matrix has one owner rank, so
               per-GPU manifold work is total / N while the micro-batch work stays; the owners'
               gather/scatter traffic is NOT in the projection).
  polar        the periodic exact polar (fp64) per matrix, times the model's matrix count, per `polar_every`.
  certify      certification throughput (fp32 features, float64 head, floating-point allowances) vs a
               plain fp32 forward at the same batch, same process.

The step timed here is the model's math without ZeRO-3 (one GPU holds everything); ZeRO-3's collectives
across nodes are the subject of the DeepSpeed configs (configs/deepspeed/), not of this file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
REPO = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peak, FLOP/s, by device-name substring (vendor datasheets, without sparsity).
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
             "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def bf16_peak(device_name: str) -> float | None:
    for key, peak in BF16_PEAK.items():
        if key in device_name:
            return peak
    return None


def plan(smoke: bool) -> list[dict]:
    """The parts to run, with per-part timeouts (seconds); the full plan fits 8 minutes on one H100/H200."""
    if smoke:
        m = {"model": "lipnext-tiny", "overrides": {"width": 32, "depth": 2}}
        return [{"part": "train_step", **m, "micro_batch": 4, "iters": 2, "timeout": 120},
                {"part": "train_step", **m, "micro_batch": 8, "iters": 2, "timeout": 120},
                {"part": "manifold", **m, "iters": 2, "micro_batch": 8, "timeout": 120},
                {"part": "polar", **m, "matrices": 2, "timeout": 120},
                {"part": "certify", **m, "batch": 8, "iters": 2, "timeout": 120}]
    big = {"model": "lipnext-1b", "overrides": {}}
    return [{"part": "train_step", **big, "micro_batch": mb, "iters": 6, "timeout": 75} for mb in (16, 32, 64)] + [
        {"part": "train_step", "model": "lipnext-2b", "overrides": {}, "micro_batch": 32, "iters": 4, "timeout": 90},
        {"part": "manifold", **big, "iters": 4, "micro_batch": 32, "timeout": 90},
        {"part": "polar", **big, "matrices": 2, "timeout": 60},
        {"part": "certify", **big, "batch": 64, "iters": 4, "timeout": 75}]


# ---------------------------------------------------------------------------------------------------
# Inside a part's process.

class Clock:
    """Device time: CUDA events on a GPU (one sync when read, none per iteration), perf_counter on CPU."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds_since(self, t0) -> float:
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return t0.elapsed_time(ev) / 1e3
        return time.perf_counter() - t0


def _setup(task: dict):
    import torch

    from lipnext_scale.model import create_model, get_spec

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = get_spec(task["model"], **task["overrides"])
    torch.manual_seed(0)
    with torch.device(device):  # built on the device: QR init of 4096^2 matrices on one CPU would take minutes
        model = create_model(task["model"], **task["overrides"])
    return torch, device, spec, model


def _images(torch, device, spec, n: int):
    return torch.rand(n, 3, spec.image_size, spec.image_size, device=device), \
        torch.randint(0, spec.num_classes, (n,), device=device)


def _device_info(torch, device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu", "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "memory_gb": round(props.total_memory / 2 ** 30, 1),
            "bf16_peak_tflops": (bf16_peak(props.name) or 0) / 1e12 or None}


def part_train_step(task: dict) -> dict:
    torch, device, spec, model = _setup(task)
    from lipnext_scale.config import LossConfig
    from lipnext_scale.train.loss import certified_loss

    model = model.to(torch.bfloat16) if device.type == "cuda" else model
    x, y = _images(torch, device, spec, task["micro_batch"])
    x = x.to(next(model.parameters()).dtype)
    cfg, clock = LossConfig(), Clock(torch, device)

    def step():
        loss = certified_loss(model(x), y, model.head.rows(), cfg.eps, cfg)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = clock.start()
    for _ in range(task["iters"]):
        step()
    seconds = clock.seconds_since(t0) / task["iters"]
    images_per_s = task["micro_batch"] / seconds
    flops = 3 * spec.flops_per_image() * images_per_s
    info = _device_info(torch, device)
    peak = info.get("bf16_peak_tflops")
    return {**info, "step_s": seconds, "images_per_s": images_per_s, "tflops": flops / 1e12,
            "mfu": flops / (peak * 1e12) if peak else None, "params": spec.num_params(),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None}


def part_manifold(task: dict) -> dict:
    torch, device, spec, model = _setup(task)
    from lipnext_scale.config import OptimConfig
    from lipnext_scale.optim import ManifoldOptimizer

    opt = ManifoldOptimizer(model, OptimConfig(total_steps=10_000))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    clock = Clock(torch, device)
    opt.step()  # state allocation and first-call costs
    times = []
    for _ in range(task["iters"]):
        t0 = clock.start()
        opt.step()
        times.append(clock.seconds_since(t0))
    matrices = sum(1 for g in opt.param_groups if g.get("kind") == "manifold" for _ in g["params"])
    return {**_device_info(torch, device), "step_s": statistics.median(times), "matrices": matrices}


def part_polar(task: dict) -> dict:
    torch, device, spec, model = _setup(task)
    from lipnext_scale.model.layers import manifold_parameters
    from lipnext_scale.optim.retraction import orthogonalize_exact

    mats = [p for _, p in manifold_parameters(model)]
    clock = Clock(torch, device)
    orthogonalize_exact(mats[-1].data)  # solver set-up
    t0 = clock.start()
    for p in mats[-task["matrices"]:]:
        p.data.copy_(orthogonalize_exact(p.data))
    per_matrix = clock.seconds_since(t0) / task["matrices"]
    return {**_device_info(torch, device), "per_matrix_s": per_matrix, "matrices": len(mats),
            "all_matrices_s": per_matrix * len(mats), "shape": list(mats[-1].shape)}


def part_certify(task: dict) -> dict:
    torch, device, spec, model = _setup(task)
    from lipnext_scale.certify.certify import model_pair_distances
    from lipnext_scale.certify.fp_error import float_error_model
    from lipnext_scale.certify.worker import Checks, certify_batch

    torch.backends.cuda.matmul.allow_tf32 = False  # certification runs in true fp32 (as the job does)
    model.eval()
    x, y = _images(torch, device, spec, task["batch"])
    pairs, fp_model = model_pair_distances(model), float_error_model(model, 1.0)
    clock = Clock(torch, device)
    with torch.no_grad():
        def forward():
            model(x).argmax(1)

        def certify():
            certify_batch(model, x, y, Checks([36 / 255]), 1.0, pair_distances=pairs, fp_model=fp_model)

        out = {}
        for name, fn in (("forward", forward), ("certify", certify), ("forward_again", forward)):
            fn()
            t0 = clock.start()
            for _ in range(task["iters"]):
                fn()
            out[f"{name}_images_per_s"] = task["batch"] * task["iters"] / clock.seconds_since(t0)
    forward_ips = (out["forward_images_per_s"] + out["forward_again_images_per_s"]) / 2
    return {**_device_info(torch, device), **out, "certify_vs_forward": out["certify_images_per_s"] / forward_ips}


PARTS = {"train_step": part_train_step, "manifold": part_manifold, "polar": part_polar, "certify": part_certify}


# ---------------------------------------------------------------------------------------------------
# The driver: one process per part, results merged and written as they come.

def run_part(task: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, __file__, "--part-json", json.dumps(task), "--part-out", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=task["timeout"], capture_output=True, text=True, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {**task, "status": "timeout", "wall_s": time.perf_counter() - t0}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            status = "out_of_memory" if "OutOfMemoryError" in proc.stderr else "failed"
            return {**task, "status": status, "wall_s": wall, "error": " | ".join(tail)}
        return {**task, "status": "ok", "wall_s": wall, **json.loads(out.read_text())}


def summarise(parts: list[dict]) -> dict:
    """The issue's targets as ratios: best MFU per model, the manifold share on 1 GPU (measured) and at 8/32/64
    GPUs (projected, and labelled so), polar per step amortised, certification vs forward."""
    ok = [p for p in parts if p["status"] == "ok"]
    out: dict = {}
    for model in sorted({p["model"] for p in ok if p["part"] == "train_step"}):
        runs = [p for p in ok if p["part"] == "train_step" and p["model"] == model]
        best = max(runs, key=lambda p: p["images_per_s"])
        out[f"{model}_best"] = {"micro_batch": best["micro_batch"], "images_per_s": best["images_per_s"],
                                "mfu": best["mfu"], "tflops": best["tflops"], "peak_memory_gb": best["peak_memory_gb"]}
    manifold = next((p for p in ok if p["part"] == "manifold"), None)
    if manifold:
        fb = next((p for p in ok if p["part"] == "train_step" and p["model"] == manifold["model"]
                   and p["micro_batch"] == manifold["micro_batch"]), None)
        if fb:
            m, f = manifold["step_s"], fb["step_s"]
            out["manifold_share_of_step"] = {"micro_batch": manifold["micro_batch"], "measured_1_gpu": m / (m + f)}
            # Arithmetic on the 1-GPU times above, not a measurement: nothing ran on n GPUs.
            out["manifold_share_of_step_projected"] = {
                "by_gpus": {str(n): (m / n) / (m / n + f) for n in (8, 32, 64)},
                "how": "PROJECTION, not measured: the 1-GPU manifold step / n (one owner rank per matrix) beside "
                       "the same micro-batch step; the owners' gather/scatter traffic is not included"}
    polar = next((p for p in ok if p["part"] == "polar"), None)
    if polar:
        out["polar_all_matrices_s"] = polar["all_matrices_s"]
        out["polar_amortised_per_step_s_at_polar_every_500"] = polar["all_matrices_s"] / 500
    cert = next((p for p in ok if p["part"] == "certify"), None)
    if cert:
        out["certify_vs_forward"] = cert["certify_vs_forward"]
    return out


def write(path: Path, parts: list[dict], smoke: bool, started: float) -> None:
    data = {"smoke": smoke, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": time.perf_counter() - started,
            "parts": parts, "summary": summarise(parts)}
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny CPU version of every part (CI)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--part-json", help=argparse.SUPPRESS)
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part_json:  # a part's own process
        task = json.loads(args.part_json)
        Path(args.part_out).write_text(json.dumps(PARTS[task["part"]](task)))
        return 0
    started, parts = time.perf_counter(), []
    for task in plan(args.smoke):
        result = run_part(task)
        parts.append(result)
        write(Path(args.out), parts, args.smoke, started)
        shown = {k: v for k, v in result.items() if k in ("images_per_s", "mfu", "step_s", "certify_vs_forward",
                                                          "per_matrix_s", "status", "error")}
        print(f"[bench_gpu] {task['part']} {task['model']} {shown}", flush=True)
    print(json.dumps(summarise(parts), indent=2))
    return 0 if all(p["status"] == "ok" for p in parts) or not args.smoke else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
