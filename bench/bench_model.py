"""One block's forward + backward against its matmuls alone, side by side in one run.

The question a user asks of a layer implementation: how much of a block's time is anything but its
big matmuls? Measured at width 1024, batch 16, 16x16 tokens (CIFAR-like at L32W1024), fp32 on the CPU:

  paper block         beta_Abs(M R^T S(R(X + p)) + b), our one-pass shift and beta-Abs
  its matmuls         the same two matmuls alone: X R^T and U (M R^T)^T as two linear maps with
                      weight gradients (forward 2, backward 4 matmuls of tokens x C x C)
  paper block, naive  the same block with the textbook layers: per-group slice + roll + cat shift,
                      slice + abs + cat beta-Abs, separate bias add, M and R^T applied one after the other
  old block           our earlier block (shift C/5 per direction, expand C -> 2C, beta-Abs, contract),
                      with the layers it shipped with (roll + cat, cat), against its own two matmuls

Each round times every variant once, back to back (in reverse order on odd rounds), after warm-up; each
comparison is the median over rounds of that round's ratio (bench/paired.py), with min, max and the per-round
ratios under "comparisons". `block_time_ratio_vs_matmuls` = paper block / its matmuls (target <= 1.3); the
other top-level ratios are the same paired medians. Results: bench/results/model.json.

    python bench/bench_model.py [--width 1024] [--batch 16] [--grid 16] [--rounds 15]
    python bench/bench_model.py --quick --out /tmp/model.json     # smoke run: tiny sizes, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from paired import comparison, paired_order  # bench/paired.py (this script's directory is on sys.path)

from lipnext_scale.model.layers import LipNeXtBlock, OrthogonalProjection, shift_group_size, shift_reference

RESULTS = Path(__file__).resolve().parent / "results" / "model.json"


def _naive_beta_abs(x: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    k = int(round(beta * x.shape[-1]))
    return torch.cat([x[..., :k].abs(), x[..., k:]], dim=-1)


def _old_shift(x: torch.Tensor) -> torch.Tensor:
    """The shift as it shipped before: 5 groups (unshifted, right, left, down, up) of C // 5, roll + cat."""
    c, parts = x.shape[-1], []
    size = c // 5
    for g, (dh, dw) in enumerate(((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))):
        part = x[..., g * size: c if g == 4 else (g + 1) * size]
        parts.append(torch.roll(part, shifts=(dh, dw), dims=(1, 2)) if dh or dw else part)
    return torch.cat(parts, dim=-1)


def make_variants(width: int, grid: int):
    torch.manual_seed(0)
    block = LipNeXtBlock(width, grid)
    size = shift_group_size(width, block.shift.alpha)
    rot, mix, bias, pos = block.rot, block.mix, block.bias, block.pos

    def paper(x):
        return block(x)

    w1 = torch.nn.Parameter(rot.detach().clone())
    w2 = torch.nn.Parameter((mix @ rot.t()).detach().clone())

    def matmuls(x):
        return F.linear(F.linear(x, w1), w2)

    def paper_naive(x):
        u = shift_reference((x + pos) @ rot.t(), size)
        return _naive_beta_abs((u @ rot) @ mix.t() + bias)

    expand, contract = OrthogonalProjection(width, 2 * width), OrthogonalProjection(2 * width, width)
    e1 = torch.nn.Parameter(expand.weight.detach().clone())
    e2 = torch.nn.Parameter(contract.weight.detach().clone())

    def old_block(x):  # the block as it shipped before the paper's (removed from the model since)
        return contract(_naive_beta_abs(expand(_old_shift(x))))

    def old_matmuls(x):
        return F.linear(F.linear(x, e1), e2)

    return {"paper_block": paper, "paper_matmuls": matmuls, "paper_block_naive_layers": paper_naive,
            "old_block": old_block, "old_matmuls": old_matmuls}


def time_fwd_bwd(fn, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    y = fn(x)
    y.backward(torch.ones_like(y))
    return time.perf_counter() - start


# name -> (ours, alternative, what): each a time of one forward + backward, lower is better
COMPARISONS = {
    "paper_block_vs_matmuls": ("paper_block", "paper_matmuls",
                               "paper block / its two matmuls alone, forward + backward time"),
    "paper_block_vs_naive_layers": ("paper_block", "paper_block_naive_layers",
                                    "paper block / the same block with textbook layers, forward + backward time"),
    "naive_layers_vs_matmuls": ("paper_block_naive_layers", "paper_matmuls",
                                "paper block with textbook layers / its two matmuls, forward + backward time"),
    "old_block_vs_matmuls": ("old_block", "old_matmuls",
                             "old expand/contract block / its two matmuls, forward + backward time"),
    "paper_block_vs_old_block": ("paper_block", "old_block",
                                 "paper block / old expand/contract block, forward + backward time"),
}
TARGETS = {"paper_block_vs_matmuls": 1.3}
# existing top-level keys (README and other readers) -> the comparison whose paired median they now hold
LEGACY_KEYS = {"block_time_ratio_vs_matmuls": "paper_block_vs_matmuls",
               "block_time_ratio_vs_matmuls_naive_layers": "naive_layers_vs_matmuls",
               "old_block_time_ratio_vs_matmuls": "old_block_vs_matmuls",
               "paper_block_vs_old_block_time": "paper_block_vs_old_block"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="smoke run: width 128, batch 2, grid 8, 2 rounds "
                                                         "(not a measurement)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.width, args.batch, args.grid, args.rounds = 128, 2, 8, 2

    variants = make_variants(args.width, args.grid)
    x = torch.randn(args.batch, args.grid, args.grid, args.width)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, fn in variants.items():  # warm-up: allocator, kernels
        for _ in range(2):
            time_fwd_bwd(fn, x)
    for r in range(args.rounds):
        for name in paired_order(r, list(variants)):
            times[name].append(time_fwd_bwd(variants[name], x))
    dtype = str(x.dtype).removeprefix("torch.")
    shape = f"width {args.width}, batch {args.batch}, {args.grid} x {args.grid} tokens, {dtype}"
    comparisons = {key: comparison(f"{what}, {shape}", times[ours], times[alt], target=TARGETS.get(key),
                                   higher_is_better=False)
                   for key, (ours, alt, what) in COMPARISONS.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.grid ** 2
    result = {
        "benchmark": "model",
        "setting": {"width": args.width, "batch": args.batch, "grid": args.grid, "tokens": tokens,
                    "dtype": dtype, "threads": torch.get_num_threads(),
                    "rounds": args.rounds, "quick": args.quick},
        **{key: comparisons[name]["median"] for key, name in LEGACY_KEYS.items()},
        "comparisons": comparisons,
        "seconds_median": median,
        "seconds_per_round": times,
        "matmul_gflops_per_s": 6 * 2 * tokens * args.width ** 2 / median["paper_matmuls"] / 1e9,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "loadavg_at_end": list(os.getloadavg())},
        "notes": [", ".join(f"{k} = comparisons.{v}.median" for k, v in LEGACY_KEYS.items())
                  + " (paired per-round medians); seconds_median is each variant's own median (not paired)"],
    }
    for key, c in comparisons.items():
        print(f"{key:<32} median {c['median']:.3f}  [{c['min']:.3f}, {c['max']:.3f}]  {c['rounds']} rounds"
              + ("" if c["target"] is None else f"  target <= {c['target']}: {'met' if c['target_met'] else 'MISSED'}"))
    for name, sec in median.items():
        print(f"  {name:<28} {sec * 1e3:8.1f} ms")
    from lipnext_scale.storage import atomic_write_bytes

    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
