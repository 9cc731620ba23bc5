"""The certification job: verify, split shards over Ray actors, merge, report. `certify_job` is the API.

Order of work, so that every bad input fails before any certification starts:
  1. load + verify the checkpoint on the driver (missing/corrupt file, refused Lipschitz bound);
  2. resolve the shards and check the data against the model (class count, image size);
  3. check `--out` belongs to this job (job.json) and skip shards whose result file exists (resume);
  4. one actor per worker loads and verifies the model once; shards are handed out one at a time to
     whichever actor is free, so each shard (hence each sample) is certified exactly once;
  5. merge the per-shard files in shard order and write the report.
The driver holds one copy of the model for step 1 (for a 2B model: ~8 GB of host memory).
"""

from __future__ import annotations

import json
import posixpath
import time

import fsspec

from lipnext_scale.config import Attack, choices
from lipnext_scale.certify.certify import DEFAULT_EPS, format_eps, parse_eps_list
from lipnext_scale.certify.data_access import data_fingerprint, preflight, resolve_shards, shard_name
from lipnext_scale.certify.fp_error import float_error_model
from lipnext_scale.certify.model_loading import CertifyError, load_model, verify_model
from lipnext_scale.certify.report import build_report, merge_shard_tables, write_outputs
from lipnext_scale.certify.worker import ShardCertifier, shard_result_url

JOB_FILE = "job.json"
ATTACKS = tuple(a for a in choices(Attack) if a)


def _check_out_dir(out_url: str, identity: dict) -> None:
    """Results already under `out_url` are reused only if they were made by this same job."""
    fs, path = fsspec.core.url_to_fs(posixpath.join(out_url, JOB_FILE))
    if fs.isfile(path):
        with fs.open(path, "rb") as f:
            previous = json.loads(f.read())
        changed = sorted(k for k in identity if previous.get(k) != identity[k])
        if changed:
            raise CertifyError(f"--out {out_url!r} holds results of a different job ({', '.join(changed)} "
                               "differ); choose a new --out, or delete it to start over")
        return
    from lipnext_scale.storage import atomic_write_bytes

    atomic_write_bytes(posixpath.join(out_url, JOB_FILE), json.dumps(identity, indent=2).encode())


def _pending(out_url: str, shards: list[str]) -> list[str]:
    fs, _ = fsspec.core.url_to_fs(out_url)
    return [s for s in shards if not fs.isfile(fsspec.core.url_to_fs(shard_result_url(out_url, s))[1])]


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc="certify", disable=not enabled, dynamic_ncols=True)


def _run_in_process(pending: list[str], out_url: str, worker_kwargs: dict, progress: bool) -> dict:
    certifier = ShardCertifier(**worker_kwargs)
    totals, started = {"samples": 0, "cpu_seconds": 0.0}, time.perf_counter()
    with _progress(len(pending), progress) as bar:
        for shard in pending:
            _add(totals, certifier.certify_shard(shard, out_url), bar)
    return {**totals, "seconds": time.perf_counter() - started}


def _add(totals: dict, shard_result: dict, bar) -> None:
    totals["samples"] += shard_result["samples"]
    totals["cpu_seconds"] += shard_result["cpu_seconds"]
    bar.update(1)
    bar.set_postfix(samples=totals["samples"])


def _unwrap(error: Exception) -> Exception:
    """A worker's CertifyError (bad sample, changed checkpoint) surfaces as itself, not a Ray traceback."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, CertifyError) else error


def _run_ray(pending: list[str], out_url: str, worker_kwargs: dict, workers: int, progress: bool,
             ray_address: str | None) -> dict:
    """{samples, seconds, cpu_seconds} of the shard phase, which starts once every actor is ready."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address)
    use_gpu = str(worker_kwargs["device"]).startswith("cuda")
    actor_cls = ray.remote(num_cpus=max(1, worker_kwargs["threads"]), num_gpus=1 if use_gpu else 0)(
        ShardCertifier)
    actors = [actor_cls.remote(**worker_kwargs, own_process=True) for _ in range(min(workers, len(pending)))]
    totals = {"samples": 0, "cpu_seconds": 0.0}
    try:
        try:
            ray.get([a.info.remote() for a in actors])  # load + verify everywhere before any shard
        except Exception as e:
            raise CertifyError(f"a certification worker failed to start: {_unwrap(e)}") from None
        started = time.perf_counter()
        queue = list(pending)
        # Two shards queued per actor: it starts the next one without waiting for the driver to answer.
        in_flight = {a.certify_shard.remote(queue.pop(0), out_url): a for _ in range(2) for a in actors if queue}
        with _progress(len(pending), progress) as bar:
            while in_flight:
                (done,), _ = ray.wait(list(in_flight), num_returns=1)
                actor = in_flight.pop(done)
                try:
                    result = ray.get(done)
                except Exception as e:
                    error = _unwrap(e)
                    raise error if isinstance(error, CertifyError) else CertifyError(
                        f"a certification worker failed: {e}") from None
                _add(totals, result, bar)
                if queue:
                    in_flight[actor.certify_shard.remote(queue.pop(0), out_url)] = actor
    finally:
        for a in actors:
            ray.kill(a)
    return {**totals, "seconds": time.perf_counter() - started}


def certify_job(ckpt_url: str, data_url: str, out_url: str, *, eps: str | list = DEFAULT_EPS, workers: int = 2,
                batch_size: int = 256, attack: str | None = None, attack_steps: int = 10,
                allow_approx: bool = False, lipschitz_tol: float = 1e-4, device: str = "cpu",
                threads_per_worker: int = 1, progress: bool = True, ray_address: str | None = None) -> dict:
    """Certify every sample of `data_url` with the model at `ckpt_url`; write and return the report.

    workers=0 runs in this process (no Ray); workers>=1 starts that many Ray actors (connecting to
    `ray_address`, or starting/joining Ray as `ray.init()` does, when Ray is not initialised yet).
    """
    eps_list = parse_eps_list(eps)  # distinct radii: two spellings of one value are an error
    if attack not in (None, "", "none") + ATTACKS:
        raise CertifyError(f"--attack {attack!r}: choose one of {', '.join(ATTACKS)} (or leave it out)")
    attack_steps = attack_steps if attack in ATTACKS else 0
    attack = attack if attack_steps > 0 else None
    if attack == "fmn":
        from lipnext_scale.certify.attack import require_foolbox

        try:
            require_foolbox()
        except ImportError as e:
            raise CertifyError(str(e)) from None
    if workers < 0 or batch_size < 1:
        raise CertifyError(f"workers={workers}, batch_size={batch_size}: need workers >= 0, batch_size >= 1")
    out_url = out_url.rstrip("/")
    started = time.perf_counter()

    loaded = load_model(ckpt_url)
    verification = verify_model(loaded.model, lipschitz_tol, allow_approx)
    spec = loaded.model.spec
    shards = resolve_shards(data_url)
    names = [shard_name(s) for s in shards]
    if len(set(names)) != len(names):
        raise CertifyError(f"--data {data_url!r}: two shards share a base name; results are stored per "
                           "shard name, so give every shard a distinct name")
    preflight(shards, spec.image_size, spec.num_classes)
    data = {"url": data_url, "shards": len(shards), "fingerprint": data_fingerprint(shards)}
    identity = {"weights_sha256": loaded.weights_sha256, "eps": [format_eps(e) for e in eps_list],
                "data_fingerprint": data["fingerprint"], "lipschitz_used": verification.lipschitz_used,
                "attack_steps": attack_steps, **({"attack": attack} if attack else {}),
                # results of the earlier certificate (no floating-point allowances) are never resumed into
                "certificate": "fp32-with-fp-allowances-1"}
    _check_out_dir(out_url, identity)
    ckpt_url = loaded.url  # workers read the very checkpoint verified here
    checkpoint = {"url": ckpt_url, "kind": loaded.kind, "model": loaded.config["model"]["name"],
                  "weights_sha256": loaded.weights_sha256}
    floating_point = float_error_model(loaded.model, verification.lipschitz_used).as_dict()  # O(C^2 + params)
    del loaded  # the workers load their own copy

    pending = _pending(out_url, shards)
    worker_kwargs = dict(ckpt_url=ckpt_url, eps_list=eps_list, batch_size=batch_size, lipschitz_tol=lipschitz_tol,
                         allow_approx=allow_approx, attack_steps=attack_steps, attack=attack or "pgd",
                         device=device,
                         threads=threads_per_worker if workers > 0 else 0,
                         expected_sha256=identity["weights_sha256"])
    run_started = time.perf_counter()
    if not pending:
        phase = {"samples": 0, "seconds": 0.0, "cpu_seconds": 0.0}
    elif workers == 0:
        phase = _run_in_process(pending, out_url, worker_kwargs, progress)
    else:
        phase = _run_ray(pending, out_url, worker_kwargs, workers, progress, ray_address)
    run_seconds = time.perf_counter() - run_started

    table = merge_shard_tables(out_url, shards)
    # images_per_s: steady state, once every worker has loaded and verified its model (a one-time
    # cost per job, reported as worker_startup_seconds); images_per_cpu_s: per CPU-second of the
    # workers' processes; total_seconds: the whole call.
    n, seconds, cpu = phase["samples"], phase["seconds"], phase["cpu_seconds"]
    timing = {"workers": workers, "shards_certified_now": len(pending), "shards_resumed": len(shards) - len(pending),
              "samples_certified_now": n, "worker_startup_seconds": run_seconds - seconds,
              "certify_seconds": seconds, "images_per_s": n / seconds if seconds > 0 else None,
              "worker_cpu_seconds": cpu, "images_per_cpu_s": n / cpu if cpu > 0 else None,
              "total_seconds": time.perf_counter() - started}
    report = build_report(table, eps_list, verification=verification.as_dict(), checkpoint=checkpoint,
                          data=data, attack_steps=attack_steps, timing=timing, attack=attack or "pgd",
                          floating_point=floating_point)
    write_outputs(out_url, table, report, eps_list)
    return report
