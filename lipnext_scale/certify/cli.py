"""`lipnext certify CKPT --data URL ...` (and launchers/certify.py): parse, build the config, call the job.

Flags override the [certify] section of `--config` (plus `--set` overrides). Exit codes: 0 done,
1 SOUNDNESS ALARM (an attack broke a certified point: a bug, never expected), 2 bad input or refused weights.
Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import sys

from lipnext_scale.errors import LipnextError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="a training checkpoint directory (ZeRO-3, any world size) or a `lipnext export` "
                                "output; any fsspec URL")
    p.add_argument("--data", required=True, help="evaluation shards: directory, brace pattern or glob (fsspec URL)")
    p.add_argument("--out", default="./certify-out", help="output directory (fsspec URL), created if missing; "
                                                          "rerun with the same --out to resume (default: "
                                                          "./certify-out)")
    p.add_argument("--eps", help="comma-separated l2 radii, fractions allowed (default: certify.eps, "
                                 "36/255,72/255,108/255)")
    p.add_argument("--actors", type=int, help="Ray actors, one model copy each (0: certify in this process; "
                                               "default: certify.actors)")
    # the old name of --actors: accepted by the parser only to say what it is called now
    p.add_argument("--workers", dest="renamed_workers", nargs="?", const="", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: certify.batch_size)")
    p.add_argument("--attack", choices=["pgd", "fmn"],
                   help="pgd: l2 PGD at each eps on the certified points; fmn: Foolbox's minimum-norm l2 attacks "
                        "(FMN + DDN; `pip install lipnext_scale[attack]`) on every correct point, reporting "
                        "empirical robust accuracy. A broken certificate is a SOUNDNESS ALARM (exit code 1)")
    p.add_argument("--attack-steps", type=int, help="attack steps (default: certify.attack_steps; use ~100 for fmn)")
    p.add_argument("--allow-approx", action="store_true", default=None,
                   help="certify weights whose Lipschitz bound exceeds 1 + tol, dividing radii by the bound")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per actor)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch CPU threads (and Ray CPUs) per actor")
    p.add_argument("--ray-address", help="Ray cluster to join (default: what ray.init() does: RAY_ADDRESS or a "
                                         "new local instance)")
    p.add_argument("--config", help="a job TOML whose [certify] section gives the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_certify(args: argparse.Namespace) -> int:
    from lipnext_scale.certify.job import CertifyRuntime, certify_job
    from lipnext_scale.certify.report import format_table
    from lipnext_scale.config import load_config

    if args.renamed_workers is not None:
        raise LipnextError("--workers is now --actors (Ray actors, one model copy each; 0: certify in this process)")
    cfg = load_config(args.config, args.set).certify
    for flag, key in (("eps", "eps"), ("actors", "actors"), ("batch_size", "batch_size"),
                      ("attack", "attack"), ("attack_steps", "attack_steps"), ("allow_approx", "allow_approx")):
        if getattr(args, flag) is not None:
            setattr(cfg, key, getattr(args, flag))
    cfg.validate()
    if cfg.actors == 0:  # this process certifies: keep freed memory, as actors do (worker.py says why)
        from lipnext_scale.certify.worker import keep_freed_memory

        keep_freed_memory()
    runtime = CertifyRuntime(device=args.device, threads_per_worker=args.threads_per_worker,
                             progress=not args.no_progress, ray_address=args.ray_address)
    report = certify_job(args.ckpt, args.data, args.out, cfg, runtime)
    print(format_table(report))
    print(f"wrote {args.out.rstrip('/')}/report.json, samples.parquet, certified_accuracy.png")
    alarms = report.get("soundness_alarm") or []
    if alarms:
        shown = ", ".join(f"{a['shard']}/{a['key']}@{a['eps']}" for a in alarms[:20])
        print(f"SOUNDNESS ALARM: {report['attack']['method']} broke {len(alarms)} certified point(s): {shown}"
              f"{' ...' if len(alarms) > 20 else ''}. A certificate was false: report this with the "
              "checkpoint and report.json", file=sys.stderr)
        return 1
    return 0
