"""`lipnext serve` under load: requests/s, p50/p99 latency and the batch sizes Serve formed, 1 and 2 replicas.

For each replica count the real CLI is started (`python -m lipnext_scale.cli serve`, its own local Ray,
HTTP on 127.0.0.1 only) on an exported lipnext-tiny; once it says it is ready, `--warmup` requests are
sent and not counted, then exactly `--requests` POST /certify requests (32x32 PNGs, cycled) from
`--concurrency` client threads, each on one keep-alive connection; then the server is stopped with
SIGTERM. Every run is bounded: a fixed request count, a timeout per request and per start-up, and it stops
by itself. Batch sizes come from the `x-lipnext-batch-size` header of each answer (a batch of b answers
b requests, so it is counted once per b answers).

The client runs on the same machine as the server (loopback): on a 2-core machine the client threads,
Serve's proxy and the replicas share the cores, so 2 replicas cannot double 1 replica's rate here; read the
numbers as the whole system's on this machine. Results: bench/results/serve.json.

    ../shared/tools/quiet --json bench/results/serve.json -- python bench/bench_serve.py
    python bench/bench_serve.py --requests 20 --warmup 4 --out /tmp/serve.json   # smoke run
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a bench must not write ~/.ray/auth_token
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_export(work: Path, model: str) -> str:
    import torch

    from lipnext_scale.ckpt import save_exported
    from lipnext_scale.config import JobConfig, config_to_dict
    from lipnext_scale.model import create_model

    cfg = config_to_dict(JobConfig())
    cfg["model"]["name"] = model
    torch.manual_seed(0)
    save_exported(create_model(model).state_dict(), cfg, str(work / "model"))
    return str(work / "model")


def make_payloads(count: int, size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Server:
    """`lipnext serve` in a process of its own; a context manager that stops it with SIGTERM."""

    def __init__(self, ckpt: str, replicas: int, args: argparse.Namespace, log: Path):
        self.port, self.log = free_port(), log
        cmd = [sys.executable, "-m", "lipnext_scale.cli", "serve", ckpt, "--replicas", str(replicas),
               "--host", "127.0.0.1", "--port", str(self.port), "--max-batch-size", str(args.max_batch_size),
               "--batch-wait-ms", str(args.batch_wait_ms)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, never a shared one
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ctrl-C stops" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"lipnext serve did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def load(port: int, payloads: list[bytes], count: int, concurrency: int) -> dict:
    """Send `count` requests from `concurrency` threads; latencies and batch sizes of every answer."""
    local = threading.local()
    lock = threading.Lock()
    latencies, batches, errors = [], Counter(), Counter()

    def one(i: int) -> None:
        conn = getattr(local, "conn", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        local.conn = conn
        started = time.perf_counter()
        try:
            conn.request("POST", "/certify", payloads[i % len(payloads)], {"Content-Type": "image/png"})
            response = conn.getresponse()
            body = response.read()
            status, batch = response.status, response.getheader("x-lipnext-batch-size")
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            local.conn = None
            with lock:
                errors[type(e).__name__] += 1
            return
        elapsed = time.perf_counter() - started
        with lock:
            if status == 200 and batch:
                latencies.append(elapsed)
                batches[int(batch)] += 1
            else:
                errors[f"HTTP {status}: {body[:120]!r}"] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    return {"wall": wall, "latencies": latencies, "batches": batches, "errors": errors}


def summarize(run: dict, requests: int) -> dict:
    lat = sorted(run["latencies"])

    def quantile(q: float) -> float | None:
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    answers = dict(sorted(run["batches"].items()))
    # b answers per batch of b; a batch that straddled the warm-up's end is counted by its timed answers
    formed = {size: count / size for size, count in answers.items()}
    return {"requests": requests, "ok": len(lat), "errors": dict(run["errors"]),
            "requests_per_s": len(lat) / run["wall"], "seconds": run["wall"],
            "latency_ms": {"p50": quantile(0.50), "p99": quantile(0.99),
                           "mean": 1000 * statistics.fmean(lat) if lat else None},
            "answers_by_batch_size": {str(k): v for k, v in answers.items()},
            "batches_formed": {str(k): round(v, 2) for k, v in formed.items()},
            "mean_batch_size": sum(answers.values()) / sum(formed.values()) if formed else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per replica count")
    parser.add_argument("--warmup", type=int, default=100, help="untimed requests first")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (one connection each)")
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure, comma-separated")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--model", default="lipnext-tiny")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.requests < 1 or args.warmup < 0 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1, --warmup >= 0")

    from lipnext_scale.storage import atomic_write_bytes, versions

    runs = {}
    loadavg_at_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = make_export(work, args.model)
        payloads = make_payloads(64, 32)
        for replicas in (int(r) for r in args.replicas.split(",")):
            with Server(ckpt, replicas, args, work / f"serve-{replicas}.log") as server:
                if args.warmup:
                    load(server.port, payloads, args.warmup, args.concurrency)
                run = load(server.port, payloads, args.requests, args.concurrency)
            runs[f"replicas_{replicas}"] = summarize(run, args.requests)
            print(f"[bench] {replicas} replica(s): {json.dumps(runs[f'replicas_{replicas}'])}", flush=True)
    result = {
        "benchmark": "serve",
        **runs,
        "setup": {"model": args.model, "image": "32x32 PNG, 64 distinct, cycled", "requests": args.requests,
                  "warmup": args.warmup, "concurrency": args.concurrency, "max_batch_size": args.max_batch_size,
                  "batch_wait_ms": args.batch_wait_ms, "threads_per_replica": 1, "device": "cpu",
                  "client": "http.client keep-alive, same machine (loopback)"},
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": loadavg_at_start,
                    "loadavg_at_end": list(os.getloadavg())},
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
