"""`lipnext serve CKPT`: certified predictions over HTTP (Ray Serve; `pip install lipnext_scale[serve]`).

The driver loads and verifies the weights exactly as `lipnext certify` does (`load_model`, `verify_model`
with the [certify] section's tolerance) and refuses to start, in one line, when they do not pass; only
then does it start Serve, whose replicas each verify their own copy again. Exit codes: 0 stopped by
Ctrl-C/SIGTERM, 2 bad input, refused weights or a replica that failed to start.
Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from lipnext_scale.errors import LipnextError

DEVICES = ("cpu", "cuda")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="a `lipnext export` output or a training checkpoint (a run directory: its newest "
                                "checkpoint); any fsspec URL")
    p.add_argument("--replicas", type=int, default=1, help="model copies, each a Ray Serve replica (default: 1)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="cpu, or cuda (one GPU per replica)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only). Another address lets "
                        "anyone who reaches it run the model on their data, with this machine's CPUs/GPUs; "
                        "Serve's HTTP proxy has no authentication of its own, so pair it with --token-file "
                        "and a TLS proxy in front")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--token-file", help="a file holding a secret token; requests must then send "
                                        "'Authorization: Bearer <token>' (the token never leaves this process: "
                                        "replicas get its sha256)")
    p.add_argument("--eps", help="comma-separated l2 radii answered in certified_at (default: certify.eps)")
    p.add_argument("--allow-approx", action="store_true", default=None,
                   help="serve weights whose Lipschitz bound exceeds 1 + tol, dividing radii by the bound")
    p.add_argument("--threads-per-replica", type=int, default=1,
                   help="torch CPU threads (and Ray CPUs) per replica (default: 1, as `lipnext certify`'s "
                        "workers: the same thread count gives the same radii bit for bit)")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests per forward at most (default: 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a replica waits for a batch to fill (default: 5 ms)")
    p.add_argument("--report", help="the certification report.json to show at GET /model (default: one beside the "
                                    "checkpoint, if it certifies these weights)")
    p.add_argument("--ray-address", help="Ray cluster to serve on (default: a new local Ray instance, shut down "
                                         "on exit)")
    p.add_argument("--config", help="a job TOML whose [certify] section gives eps, lipschitz_tol and allow_approx")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")


class ServeArgumentError(LipnextError, ValueError):
    """A flag no server could run with; the message names it and the fix."""


def _check_flags(args: argparse.Namespace) -> None:
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        raise ServeArgumentError(f"--host {args.host!r}: give an IP address (127.0.0.1, or 0.0.0.0 for every "
                                 "interface)") from None
    if not 0 < args.port < 65536:
        raise ServeArgumentError(f"--port {args.port}: must be in 1..65535")
    if args.replicas < 1 or args.threads_per_replica < 1 or args.max_batch_size < 1:
        raise ServeArgumentError(f"--replicas {args.replicas}, --threads-per-replica {args.threads_per_replica}, "
                                 f"--max-batch-size {args.max_batch_size}: each must be >= 1")
    if not 0 <= args.batch_wait_ms <= 10_000:
        raise ServeArgumentError(f"--batch-wait-ms {args.batch_wait_ms}: must be in [0, 10000]")


def _read_token(path: str) -> str:
    from lipnext_scale.storage import read_bytes

    try:
        token = read_bytes(path, ServeArgumentError).decode().strip()
    except (ServeArgumentError, UnicodeDecodeError) as e:
        raise ServeArgumentError(f"--token-file {path!r}: cannot read it ({e})") from None
    if len(token) < 16:
        raise ServeArgumentError(f"--token-file {path!r}: the token must be at least 16 characters (e.g. "
                                 "`python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return token


def prepare(args: argparse.Namespace):
    """(ServeSettings, description): flags checked, weights loaded and verified on this process."""
    from lipnext_scale.certify.fp_error import float_error_model
    from lipnext_scale.certify.model_loading import load_model, verify_model
    from lipnext_scale.config import load_config
    from lipnext_scale.serve.deployment import ServeSettings, token_sha256
    from lipnext_scale.serve.describe import describe_model, find_report

    _check_flags(args)
    token = _read_token(args.token_file) if args.token_file else None
    cfg = load_config(args.config, args.set).certify
    for flag in ("eps", "allow_approx"):
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    cfg.validate()
    eps = cfg.radii()
    loaded = load_model(args.ckpt)
    verification = verify_model(loaded.model, cfg.lipschitz_tol, cfg.allow_approx)
    floating_point = float_error_model(loaded.model, verification.lipschitz_used).as_dict()
    description = describe_model(loaded, verification, floating_point, eps, find_report(loaded, args.report))
    settings = ServeSettings(ckpt_url=loaded.url, weights_sha256=loaded.weights_sha256, eps=tuple(eps),
                             lipschitz_tol=cfg.lipschitz_tol, allow_approx=cfg.allow_approx,
                             description=description, device=args.device, threads=args.threads_per_replica,
                             max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                             token_sha256=token_sha256(token) if token else None)
    return settings, description


def run_serve(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve  # noqa: F401  (the extra's presence, checked before any work)
    except ImportError:
        raise LipnextError("`lipnext serve` needs Ray Serve: pip install 'lipnext_scale[serve]'") from None
    settings, description = prepare(args)  # bad flags, config or weights: a LipnextError naming them
    from lipnext_scale.runtime import connect_ray
    from lipnext_scale.serve.deployment import shut_down, start, stop_on_sigterm, wait_forever

    lip = description["lipschitz"]
    print(f"[serve] verified {description['model']['name']} (weights sha256 {settings.weights_sha256[:12]}..., "
          f"Lipschitz bound {lip['lipschitz_bound']:.6g}, max orthogonality error "
          f"{lip['max_orthogonality_error']:.2e})", flush=True)
    owns_ray = args.ray_address is None and not ray.is_initialized()
    try:
        # A Ray instance of its own unless told to join one; a failed replica start raises ServeStartError.
        connect_ray("local" if owns_ray else args.ray_address, dashboard=False if owns_ray else None,
                    log_to_driver=False)
        stop_on_sigterm()
        start(settings, args.replicas, args.host, args.port)
        url = f"http://{args.host}:{args.port}"
        print(f"[serve] {args.replicas} replica(s) on {args.device} at {url}: POST {url}/certify (an image), "
              f"GET {url}/model{'; token required' if settings.token_sha256 else ''}. Ctrl-C stops", flush=True)
        if not ipaddress.ip_address(args.host).is_loopback and not settings.token_sha256:
            print(f"[serve] warning: listening on {args.host} without --token-file: anyone who reaches this port "
                  "can run the model", file=sys.stderr, flush=True)
        wait_forever()
    except KeyboardInterrupt:
        pass
    finally:
        shut_down(owns_ray)
    print("[serve] stopped", flush=True)
    return 0
