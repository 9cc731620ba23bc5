"""The certification job: verify, split shards over Ray actors, merge, report. `certify_job` is the API.

Order of work, so that every bad input fails before any certification starts:
  1. check the URLs (empty, unknown protocol, `--out` a file or under one, process-local storage that
     actors cannot see); nothing is loaded or written yet;
  2. load + verify the checkpoint on the driver (missing/corrupt file, refused Lipschitz bound);
  3. resolve the shards and check the data against the model (class count, image size);
  4. check `--out` belongs to this job (job.json, written there first: a read-only `--out` fails here)
     and skip shards whose result file is readable (resume; an unreadable one is recomputed);
  5. one model copy per Ray actor, each loaded and verified once; shards are handed out one at a time to
     whichever actor is free, so each shard (hence each sample) is certified exactly once; an actor killed
     halfway through a shard is restarted and the shard certified again from its start;
  6. merge the per-shard files in shard order and write the report.
The driver holds one copy of the model for step 2 (for a 2B model: ~8 GB of host memory).
Every file is written through `storage.atomic_write_bytes`: a crash leaves a `*.tmp-*` sibling, never a
half file under a final name, and a rerun with the same `--out` finishes the job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from lipnext_scale.config import Attack, CertifyConfig, choices
from lipnext_scale.certify.data_access import (checkpoint_dataset, data_fingerprint, preflight, resolve_shards,
                                              shard_name)
from lipnext_scale.certify.fp_error import float_error_model
from lipnext_scale.certify.model_loading import CertifyError, load_model, verify_model
from lipnext_scale.certify.report import build_report, merge_shard_tables, read_shard_result, write_outputs
from lipnext_scale.certify.worker import RESULTS_DIR, CertifierProcess, Checks, ShardCertifier, shard_result_url
from lipnext_scale.eps import format_eps
from lipnext_scale.storage import (check_url, exists, file_in_the_way, is_dir, is_process_local, join_url, list_dir,
                                   parse_json, read_bytes, write_json)

log = logging.getLogger(__name__)
JOB_FILE = "job.json"
ACTOR_RESTARTS = 3  # per actor: a process that dies is replaced this often before the job gives up
ATTACKS = tuple(a for a in choices(Attack) if a)


def _check_url(what: str, url: str) -> None:
    try:
        check_url(url, CertifyError)
    except CertifyError as e:
        raise CertifyError(f"{what}: {e}") from None


def _check_urls(ckpt_url: str, data_url: str, out_url: str, actors: int) -> None:
    """Refuse, before anything is loaded or written, URLs no run could use. Whether `--out` is writable
    is proven by writing job.json (step 4), still before any actor starts."""
    for what, url in (("checkpoint", ckpt_url), ("--data", data_url), ("--out", out_url)):
        _check_url(what, url)
        if actors > 0 and is_process_local(url, CertifyError):
            raise CertifyError(f"{what} {url!r} lives in this process's memory, which Ray actors cannot "
                               "reach; use a shared path (local disk, s3://, gs://) or --actors 0")
    in_the_way = file_in_the_way(out_url, CertifyError)
    if in_the_way is not None:
        where = "is a file" if in_the_way == out_url else f"is inside {in_the_way!r}, which is a file"
        raise CertifyError(f"--out {out_url!r} {where}, but --out must be a directory; choose another path")


def _read_job_file(job_url: str, start_over: str) -> dict:
    """job.json as an earlier run wrote it. Anything else (empty, not UTF-8, not JSON, not an object) was
    damaged outside the job, which writes it atomically: an error saying how to start over."""
    try:
        raw = read_bytes(job_url, CertifyError)
    except CertifyError as e:
        raise CertifyError(f"{e}; {start_over}") from None
    untrusted = f"so the results next to it cannot be trusted; {start_over}"
    if not raw:
        raise CertifyError(f"{job_url!r} is not a certification job's description (an empty file), {untrusted}")
    previous = parse_json(raw, f"{job_url!r} (a certification job's description)", untrusted, CertifyError)
    if not isinstance(previous, dict):
        raise CertifyError(f"{job_url!r} is not a certification job's description (a JSON "
                           f"{type(previous).__name__}, not an object), {untrusted}")
    return previous


def _check_out_dir(out_url: str, identity: dict) -> None:
    """Results already under `out_url` are reused only if job.json says this same job made them."""
    job_url = join_url(out_url, JOB_FILE)
    start_over = f"delete {out_url!r} to start over, or choose another --out"
    if exists(job_url, CertifyError):
        previous = _read_job_file(job_url, start_over)
        changed = sorted(k for k in identity if previous.get(k) != identity[k])
        if changed:
            raise CertifyError(f"--out {out_url!r} holds results of a different job ({', '.join(changed)} "
                               f"differ); {start_over}")
        return
    results = join_url(out_url, RESULTS_DIR)
    if is_dir(results, CertifyError) and any(e.name.endswith(".parquet") for e in list_dir(results, CertifyError)):
        # job.json is written before any result: without it nobody knows which job these belong to
        raise CertifyError(f"--out {out_url!r} holds shard results but no {JOB_FILE}; {start_over}")
    write_json(job_url, identity, CertifyError)


def _pending(out_url: str, shards: list[str]) -> tuple[list[str], list[str]]:
    """(shards to certify now, those among them whose result file exists but cannot be read). A broken
    result (a file cut short or damaged outside the job: the job itself writes atomically) is logged,
    recomputed and replaced atomically, and counted in the report."""
    pending, broken = [], []
    for shard in shards:
        url = shard_result_url(out_url, shard)
        if exists(url, CertifyError):
            try:
                read_shard_result(url)
                continue
            except CertifyError as e:
                log.warning("%s: certifying shard %s again", e, shard)
                broken.append(shard_name(shard))
        pending.append(shard)
    return pending, broken


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


def _run_ray(pending: list[str], out_url: str, worker_kwargs: dict, actors: int, runtime: CertifyRuntime) -> dict:
    """{samples, seconds, cpu_seconds} of the shard phase, which starts once every actor is ready."""
    import ray

    from lipnext_scale.runtime import connect_ray

    connect_ray(runtime.ray_address)
    process = worker_kwargs["process"]
    use_gpu = str(process.device).startswith("cuda")
    # An actor whose process dies (killed, out of memory, its node lost) is restarted by Ray and its shards
    # certified again: a shard's result is written atomically once the shard is done, so nothing half-done
    # survives it, and the report is the one an uninterrupted run gives. An exception is not retried.
    actor_cls = ray.remote(num_cpus=max(1, process.threads), num_gpus=1 if use_gpu else 0,
                           max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(ShardCertifier)
    own = {**worker_kwargs, "process": replace(process, own_process=True)}
    pool = [actor_cls.remote(**own) for _ in range(min(actors, len(pending)))]
    totals = {"samples": 0, "cpu_seconds": 0.0}
    try:
        try:
            ray.get([a.info.remote() for a in pool])  # load + verify everywhere before any shard
        except Exception as e:
            raise CertifyError(f"a certification worker failed to start: {_unwrap(e)}") from None
        started = time.perf_counter()
        queue = list(pending)
        # Two shards queued per actor: it starts the next one without waiting for the driver to answer.
        in_flight = {a.certify_shard.remote(queue.pop(0), out_url): a for _ in range(2) for a in pool if queue}
        with _progress(len(pending), runtime.progress) as bar:
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
        for a in pool:
            ray.kill(a)
    return {**totals, "seconds": time.perf_counter() - started}


@dataclass(frozen=True)
class CertifyRuntime:
    """Facts of the process that runs a certification job, not choices of the job (those are `CertifyConfig`):
    `device` of every certifying process ("cpu", or "cuda": one GPU per actor), `threads_per_worker` (each
    actor's torch threads and Ray CPUs), a progress bar or not, and the Ray cluster to join (None: connect_ray's
    default)."""

    device: str = "cpu"
    threads_per_worker: int = 1
    progress: bool = True
    ray_address: str | None = None


def certify_job(ckpt_url: str, data_url: str, out_url: str, cfg: CertifyConfig | None = None,
                runtime: CertifyRuntime | None = None) -> dict:
    """Certify every sample of `data_url` with the model at `ckpt_url`; write and return the report.

    `cfg` is the job config's certify section (eps, actors, batch_size, attack, attack_steps, allow_approx,
    lipschitz_tol; None: its defaults). cfg.actors=0 certifies in this process (no Ray); actors>=1 starts that
    many Ray actors, one model copy each (connecting to `runtime.ray_address`, or starting/joining Ray as
    `connect_ray` does, when Ray is not initialised yet).
    """
    cfg = cfg or CertifyConfig()
    runtime = runtime or CertifyRuntime()
    actors, batch_size, lipschitz_tol = cfg.actors, cfg.batch_size, cfg.lipschitz_tol
    eps_list = cfg.radii()  # distinct radii: two spellings of one value are an error
    attack = cfg.attack
    if attack not in (None, "", "none") + ATTACKS:
        raise CertifyError(f"--attack {attack!r}: choose one of {', '.join(ATTACKS)} (or leave it out)")
    attack_steps = cfg.attack_steps if attack in ATTACKS else 0
    attack = attack if attack_steps > 0 else None
    if attack == "fmn":
        from lipnext_scale.certify.attack import require_foolbox

        try:
            require_foolbox()
        except ImportError as e:
            raise CertifyError(str(e)) from None
    if actors < 0 or batch_size < 1:
        raise CertifyError(f"actors={actors}, batch_size={batch_size}: need actors >= 0, batch_size >= 1")
    _check_urls(ckpt_url, data_url, out_url, actors)
    out_url = out_url.rstrip("/") or out_url
    started = time.perf_counter()

    loaded = load_model(ckpt_url)
    verification = verify_model(loaded.model, lipschitz_tol, cfg.allow_approx)
    spec = loaded.model.spec
    shards = resolve_shards(data_url)
    names = [shard_name(s) for s in shards]
    if len(set(names)) != len(names):
        raise CertifyError(f"--data {data_url!r}: two shards share a base name; results are stored per "
                           "shard name, so give every shard a distinct name")
    preflight(shards, spec.image_size, spec.num_classes, checkpoint_dataset(loaded.config))
    data = {"url": data_url, "shards": len(shards), "fingerprint": data_fingerprint(shards)}
    identity = {"weights_sha256": loaded.weights_sha256, "eps": [format_eps(e) for e in eps_list],
                "data_fingerprint": data["fingerprint"], "lipschitz_used": verification.lipschitz_used,
                "attack_steps": attack_steps, **({"attack": attack} if attack else {}),
                # results of the earlier certificate (no floating-point allowances) are never resumed into
                "certificate": "fp32-with-fp-allowances-1"}
    _check_out_dir(out_url, identity)
    ckpt_url = loaded.url  # actors read the very checkpoint verified here
    checkpoint = {"url": ckpt_url, "kind": loaded.kind, "model": loaded.config["model"]["name"],
                  "weights_sha256": loaded.weights_sha256}
    floating_point = float_error_model(loaded.model, verification.lipschitz_used).as_dict()  # O(C^2 + params)
    del loaded  # each worker (this process or an actor) loads its own copy

    pending, broken = _pending(out_url, shards)
    checks = Checks(eps_list, attack_steps, attack or "pgd")
    worker_kwargs = dict(ckpt_url=ckpt_url, checks=checks,
                         batch_size=batch_size, lipschitz_tol=lipschitz_tol, allow_approx=cfg.allow_approx,
                         process=CertifierProcess(runtime.device, runtime.threads_per_worker if actors > 0 else 0),
                         expected_sha256=identity["weights_sha256"])
    run_started = time.perf_counter()
    if not pending:
        phase = {"samples": 0, "seconds": 0.0, "cpu_seconds": 0.0}
    elif actors == 0:
        phase = _run_in_process(pending, out_url, worker_kwargs, runtime.progress)
    else:
        phase = _run_ray(pending, out_url, worker_kwargs, actors, runtime)
    run_seconds = time.perf_counter() - run_started

    table = merge_shard_tables(out_url, shards)
    # images_per_s: steady state, once every worker has loaded and verified its model (a one-time
    # cost per job, reported as worker_startup_seconds); images_per_cpu_s: per CPU-second of the
    # workers' processes; total_seconds: the whole call.
    n, seconds, cpu = phase["samples"], phase["seconds"], phase["cpu_seconds"]
    timing = {"actors": actors, "shards_certified_now": len(pending), "shards_resumed": len(shards) - len(pending),
              "shards_recomputed": len(broken),  # their result file was unreadable (in shards_certified_now)
              "samples_certified_now": n, "worker_startup_seconds": run_seconds - seconds,
              "certify_seconds": seconds, "images_per_s": n / seconds if seconds > 0 else None,
              "worker_cpu_seconds": cpu, "images_per_cpu_s": n / cpu if cpu > 0 else None,
              "total_seconds": time.perf_counter() - started}
    report = build_report(table, checks, verification=verification.as_dict(), checkpoint=checkpoint, data=data,
                          timing=timing, floating_point=floating_point)
    write_outputs(out_url, table, report, eps_list)
    return report
