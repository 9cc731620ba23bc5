"""Ablations on digits with the demo's budget: which block, loss and manifold optimizer to default to.

Every variant is the demo recipe (`configs/train/demo.toml`: lipnext-tiny, 600 steps, global batch 2 x 32,
the same schedule) with a few `--set`-style overrides, trained for each seed and certified on the 300
held-out digits by `certify_job` (the code behind `lipnext certify`: weights verified, float64 margins):

  paper             the defaults: the paper's block beta_Abs(M R^T S(R(X + p)) + b), EMMA, the default optimizer
  paper_no_pos      the paper's block without its positional encoding p
  old_block         our earlier expand/contract block (C -> 2C -> C, no p, no bias): removed from the model
                    since, so these rows (and old_block_old_optimizer's) are kept from the run at commit
                    723d7c2, where `model.block = "expand"` still existed
  margin_loss       the paper's block with our earlier fixed-offset margin loss (no eps ramp)
  old_optimizer     the paper's block with our earlier optimizer (heavy-ball momentum + Newton-Schulz polar)
  old_block_old_optimizer   the earlier block with the earlier optimizer it was tuned with (EMMA)
  emma_no_ramp      EMMA at a fixed eps = 36/255 (no LiResNet++ ramp): separates the loss from the ramp

Training runs in this process with `ManifoldOptimizer` on the global batch (the ZeRO-3 step computes the
same update: tests/integration/test_sharded_optim.py), so the comparison costs minutes, not a Ray job per
run. Reported per variant: mean and spread (min, max) over seeds of clean accuracy and CRA at
36/255, 72/255, 108/255, and the per-seed figures. Results: bench/results/ablation.json.

    python bench/bench_ablation.py [--seeds 0,1,2] [--steps 600] [--variants paper,old_block]

Variants run now replace their entries in an existing results file with the same steps and seeds; the
others are kept (also the historical old_block rows), so one variant can be re-run alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # certify_job runs in-process; nothing may touch ~/.ray

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "ablation.json"
DEMO = REPO / "configs" / "train" / "demo.toml"
OLD_OPTIMIZER = ["optim.retraction=polar_ns", "optim.moments=momentum", "optim.lookahead_k=0", "optim.lr=0.02",
                 "optim.euclid_optimizer=adamw", "optim.euclid_lookahead_k=0"]
VARIANTS: dict[str, list[str]] = {
    "paper": [],
    "paper_no_pos": ["model.positional=false"],
    "margin_loss": ["loss.kind=margin", "loss.eps_ramp_start=1.0", "loss.eps_ramp_end=1.0", "loss.offset=1.0",
                    "loss.temperature=0.25"],
    "old_optimizer": OLD_OPTIMIZER,
    # the optimizer's defaults before issue 22 (Lookahead k 5, manifold betas (0.9, 0.99), the paper's ||A||_F
    # branch rule; FastExp then called matrix_exp beyond order 4, now the scaled Taylor series)
    "optimizer_before_issue22": ["optim.lookahead_k=5", "optim.manifold_betas=[0.9, 0.99]",
                                 'optim.fast_exp_rule="frobenius"'],
    # control: is it the loss or the ramp?
    "emma_no_ramp": ["loss.eps_ramp_start=1.0", "loss.eps_ramp_end=1.0"],  # EMMA at a fixed 36/255
}
EPS_KEYS = ("36/255", "72/255", "108/255")


def prepare_digits(work: Path) -> Path:
    from lipnext_scale.data.prep import ShardFormat, prepare

    out = work / "digits"
    prepare("digits", None, str(out), ShardFormat(image_size=32), progress=False)
    return out


def train_and_certify(overrides: list[str], seed: int, steps: int, data: Path, work: Path) -> dict:
    import torch

    from lipnext_scale.certify.job import CertifyRuntime, certify_job
    from lipnext_scale.config import CertifyConfig, config_to_dict, load_config
    from lipnext_scale.data.shards import LoaderRuntime, make_train_loader
    from lipnext_scale.model import create_model
    from lipnext_scale.optim import ManifoldOptimizer
    from lipnext_scale.ckpt import save_exported
    from lipnext_scale.train.loss import certified_loss, training_eps

    cfg = load_config(DEMO, [f"train.steps={steps}", f"train.seed={seed}", *overrides])
    torch.manual_seed(seed)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
                         **cfg.model.overrides())
    optimizer = ManifoldOptimizer(model, cfg.optim)
    global_batch = cfg.data.batch_size * cfg.train.num_workers * cfg.train.grad_accum
    loader = make_train_loader(str(data / "train-manifest.parquet"),
                               dataclasses.replace(cfg.data, batch_size=global_batch, loader_processes=1,
                                                   seed=cfg.data.seed + seed),
                               image_size=cfg.model.image_size, runtime=LoaderRuntime(deterministic=True))
    batches = iter(loader)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        images, labels = next(batches)
        loss = certified_loss(model(images), labels, model.head.rows(), training_eps(step, steps, cfg.loss), cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == steps - 1:
            optimizer.request_lookahead_sync()  # the run's end is evaluated and certified: slow = fast, as training does
        optimizer.step()
    train_s = time.perf_counter() - start
    export = work / f"export-{os.getpid()}-{time.monotonic_ns()}"
    save_exported(model.state_dict(), config_to_dict(cfg), str(export))
    report = certify_job(str(export), str(data / "val-manifest.parquet"), str(export / "certify"),
                         CertifyConfig(eps=cfg.certify.eps, actors=0), CertifyRuntime(progress=False))
    return {"seed": seed, "clean": report["clean_accuracy"],
            **{f"cra@{k}": report["certified_accuracy"][k] for k in EPS_KEYS},
            "train_seconds": round(train_s, 1), "final_loss": float(loss.detach())}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("clean", *(f"cra@{k}" for k in EPS_KEYS)):
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.mean(values), "min": min(values), "max": max(values),
                    "std": statistics.pstdev(values)}
    return out


def _commit() -> str:
    """The commit each variant is measured at, "+dirty" when the tree differs from it (rows of other variants keep
    theirs: a file can mix commits, each row says which)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: immune to other load on the machine; runs are compute-light)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"bench_ablation: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")

    import torch

    torch.set_num_threads(args.threads)
    result = {"benchmark": "ablation", "steps": args.steps, "seeds": seeds, "config": str(DEMO.relative_to(REPO)),
              "variants": {}, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                          "threads": torch.get_num_threads()}}
    commit = _commit()
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if previous.get("steps") == args.steps and previous.get("seeds") == seeds:
        result["variants"] = dict(previous.get("variants", {}))
    with tempfile.TemporaryDirectory(prefix="lipnext-ablation-") as tmp:
        work = Path(tmp)
        data = prepare_digits(work)
        for name in names:
            runs = []
            for seed in seeds:
                run = train_and_certify(VARIANTS[name], seed, args.steps, data, work)
                print(f"{name:<16} seed {seed}: clean {run['clean']:.3f}  "
                      + "  ".join(f"{k} {run[f'cra@{k}']:.3f}" for k in EPS_KEYS)
                      + f"  ({run['train_seconds']} s)", flush=True)
                runs.append(run)
            result["variants"][name] = {"overrides": VARIANTS[name], "summary": summarise(runs), "runs": runs,
                                        "measured_at_commit": commit}
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a stop
    print(f"\n{'variant':<16}{'clean':>16}" + "".join(f"{'CRA ' + k:>18}" for k in EPS_KEYS))
    for name, v in result["variants"].items():
        s = v["summary"]
        cells = [f"{100 * s[k]['mean']:6.1f} ({100 * (s[k]['max'] - s[k]['min']):4.1f})"
                 for k in ("clean", *(f"cra@{e}" for e in EPS_KEYS))]
        print(f"{name:<16}" + "".join(f"{c:>18}" for c in cells))
    print("(mean over seeds, spread max - min in brackets, %)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
