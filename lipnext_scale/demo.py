"""`lipnext demo`: the embedded default, end to end on one machine in a few minutes.

1. prepare the digits data set (real 8x8 handwritten digits, upsampled to 32x32) into shards under
   `{out}/data/digits`, on the first run only;
2. start a local Ray instance (CPU, dashboard on 127.0.0.1);
3. train lipnext-tiny with 2 CPU workers under DeepSpeed ZeRO-3 (configs/train/demo.toml); every
   checkpoint is certified on the held-out split by `lipnext certify`'s job in a Ray task of its own while
   training goes on (`lipnext_scale.certify.during_training`; one extra CPU slot is given to Ray for it);
4. print clean accuracy and CRA from the last certified checkpoint's report (the final one's, normally):
   no separate certification pass;
5. leave checkpoints, TensorBoard logs and the certification reports in `{out}/{name}`.

It is the same library code path as `lipnext train`; only the defaults are local.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from lipnext_scale.errors import RunFailed
from lipnext_scale.runtime import connect_ray
from lipnext_scale.train.cli import add_set_argument, build_train_config, dataset_overrides, toml_string

DEMO_CONFIG = "configs/train/demo.toml"
CERTIFY_ACTORS = 1  # beside 2 training workers on a small machine, one actor certifies as fast as more


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs", help="directory for the data set and the run (default: ./runs)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo config's)")
    p.add_argument("--name", default=None, help="run name (default: demo-YYYYmmdd-HHMMSS, a fresh run)")
    add_set_argument(p)


def digits_dir(out: Path) -> Path:
    return out / "data" / "digits"


def digits_ready(data_dir: Path) -> bool:
    """True when a previous run finished preparing both splits (an interrupted prep is not ready)."""
    from lipnext_scale.data.manifest import CLASSES_FILE, manifest_meta, manifest_url, read_manifest
    from lipnext_scale.storage import is_file, join_url

    if not is_file(join_url(str(data_dir), CLASSES_FILE)):
        return False
    for split in ("train", "val"):
        manifest = manifest_url(str(data_dir), split)
        if not is_file(manifest) or not manifest_meta(read_manifest(manifest)).get("complete"):
            return False
    return True


def ensure_digits(data_dir: Path) -> bool:
    """Prepare the digits shards (on the running Ray instance) unless they are ready; True if it ran now."""
    if digits_ready(data_dir):
        return False
    from lipnext_scale.data.prep import ShardFormat, prepare

    prepare("digits", None, str(data_dir), ShardFormat(image_size=32), progress=False)
    return True


def demo_config(out: Path, name: str, steps: int | None, user_overrides: list[str]):
    """The demo's JobConfig: demo.toml, local data and storage, the user's --set values, then --steps
    (which sets the run length and the schedule length together, warmup clipped to fit)."""
    base = [*dataset_overrides(str(digits_dir(out))), f"train.storage={toml_string(str(out))}",
            f"train.name={toml_string(name)}", f"certify.actors={CERTIFY_ACTORS}"]
    cfg = build_train_config(DEMO_CONFIG, base + list(user_overrides))
    if steps is not None:
        cfg.train.steps = steps  # the schedule length follows (JobConfig.validate)
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(steps, 0))
        cfg.validate()
    return cfg


def run_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out).resolve()  # absolute: Ray workers do not share this process's cwd
    name = args.name or time.strftime("demo-%Y%m%d-%H%M%S")
    cfg = demo_config(out, name, args.steps, args.overrides)  # a bad --set: ConfigError
    run_dir = out / name

    # Entry-point setting, inherited by the Ray workers started below: DeepSpeed's calls of deprecated
    # torch.distributed names print a FutureWarning per step that would bury the demo's output.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    import ray

    from lipnext_scale.certify.report import format_table, read_report
    from lipnext_scale.storage import write_json
    from lipnext_scale.train.trainer import run_training

    # A new local Ray instance for this process only (never an existing cluster), its dashboard on 127.0.0.1,
    # the workers' progress bar and warnings forwarded here; one CPU slot more than the machine's cores: the
    # certification of each checkpoint runs beside training.
    context = connect_ray("local", num_cpus=max(2, os.cpu_count() or 2) + cfg.certify.cpus_and_gpus()[0],
                          dashboard=True, log_to_driver=True)
    seconds: dict[str, float] = {}
    try:
        if context is not None:
            print(f"[demo] Ray dashboard: http://{context.dashboard_url}", flush=True)
        t0 = time.perf_counter()
        if ensure_digits(digits_dir(out)):
            print(f"[demo] prepared the digits shards in {digits_dir(out)} (first run only)", flush=True)
        seconds["prepare"] = time.perf_counter() - t0
        print(f"[demo] training {cfg.model.name} for {cfg.train.steps} steps on {cfg.train.num_workers} "
              f"CPU workers (DeepSpeed ZeRO-3) into {run_dir}", flush=True)
        t0 = time.perf_counter()
        result = run_training(cfg)
        seconds["train_and_certify"] = time.perf_counter() - t0
    finally:  # a diverged run raises TrainingDiverged (exit code 1)
        ray.shutdown()
    seconds["total"] = time.perf_counter() - started

    certified = last_certified(result)
    if certified is None:
        raise RunFailed(f"no checkpoint of {run_dir} was certified (see {run_dir / 'certify'} for why)")
    step, report_path = certified
    report = read_report(report_path, f"rerun the demo with a new --name (or certify {run_dir}'s checkpoint again)")
    summary = {"run_dir": str(run_dir), "checkpoint": result["checkpoint"], "steps": cfg.train.steps,
               "certified_step": step, "report": report_path,
               "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "clean_accuracy": report["clean_accuracy"], "certified_accuracy": report["certified_accuracy"]}
    write_json(str(run_dir / "demo-summary.json"), summary, sort_keys=True)
    print(f"[demo] certificate of the checkpoint at step {step} (certified while training ran):")
    print(format_table(report))
    print(f"[demo] done in {seconds['total']:.0f} s (prepare {seconds['prepare']:.0f} s, train + certify "
          f"{seconds['train_and_certify']:.0f} s). Everything is in {run_dir}")
    print(f"[demo]   checkpoints:  {result['checkpoint']}")
    print(f"[demo]   report:       {report_path}")
    print(f"[demo]   TensorBoard:  tensorboard --logdir {run_dir} --host 127.0.0.1")
    return 0


def last_certified(result: dict) -> tuple[int, str] | None:
    """(step, report.json path) of the newest checkpoint certified during the run, if any."""
    latest = (result.get("certified") or {}).get("latest")
    return (latest["step"], latest["report"]) if latest else None
