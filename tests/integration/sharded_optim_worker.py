"""One rank of the real DeepSpeed ZeRO-3 run behind tests/integration/test_sharded_optim.py.

Spawned by the test with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set; writes its findings to
OUT/result_rank{rank}.json and (rank 0) the tensors the test compares with a single-process run.
Everything here is real: DeepSpeed on CPU (gloo), ZeRO-3 partitioned fp32 masters, bf16 or fp32 compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# Shared with the test: the model, optimizer config and data both sides use.
GLOBAL_BATCH = 8
IN = 12
SYNC_STEPS = {0}  # a Lookahead synchronisation requested off the k = 2 schedule (before an eval/checkpoint)


def optim_config():
    from lipnext_scale.config import OptimConfig

    # every feature on: Adam-type moments, FastExp, polish, Lookahead (k=2) and exact polar (every 3) on the
    # matrices; NAdam + Lookahead on the rest
    return OptimConfig(lr=0.02, retraction="fast_exp", moments="adam", lookahead_k=2, polar_every=3,
                       euclid_optimizer="nadam", euclid_lookahead_k=2, euclid_lr=1e-2, warmup_steps=1,
                       total_steps=10, grad_clip=0.5,
                       manifold_bucket_mb=0.002)  # ~500 floats: several gather/scatter rounds per step


class Net(torch.nn.Module):
    """Square, tall and wide manifold matrices of odd sizes (padded ZeRO-3 partitions, two of one shape so
    owners stack them) and Euclidean parameters; independent of the LipNeXt model code."""

    def __init__(self):
        super().__init__()
        from lipnext_scale.model.layers import OrthogonalProjection

        self.stem = OrthogonalProjection(IN, 21)  # tall 21 x 12
        self.rot, self.mix = OrthogonalProjection(21, 21), OrthogonalProjection(21, 21)  # square
        self.down = OrthogonalProjection(21, 9)  # wide 9 x 21
        self.bias = torch.nn.Parameter(torch.zeros(21))
        self.head = torch.nn.Linear(9, 10)

    def forward(self, x):
        h = self.mix((self.rot(self.stem(x)) + self.bias).abs())
        return self.head(self.down(h))


def build_model():
    torch.manual_seed(0)
    return Net()


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.rand(GLOBAL_BATCH, IN, generator=gen), torch.randint(0, 10, (GLOBAL_BATCH,), generator=gen)


def single_process(init_state, steps, optimizer_state=None):
    """The same training in one process with ManifoldOptimizer (the reference for both ZeRO-3 modes)."""
    from lipnext_scale.optim import ManifoldOptimizer

    model = build_model()
    model.load_state_dict(init_state)
    opt = ManifoldOptimizer(model, optim_config())
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x) * 10.0, y).backward()
        if step in SYNC_STEPS:
            opt.request_lookahead_sync()
        opt.step()
    return model, opt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["fp32", "bf16"], required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_local_grad

    from lipnext_scale.optim import ShardedManifoldStep, build_zero3_optimizers, orthogonality_error
    from lipnext_scale.train.engine import init_distributed

    init_distributed("cpu")  # the trainer's: no JIT build of DeepSpeed's inference kernel
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = optim_config()
    model = build_model()
    if rank == 0:
        torch.save(model.state_dict(), out / "init.pt")
    client_opt, manifold_names = build_zero3_optimizers(model, cfg)
    ds_config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True, "bf16": {"enabled": args.mode == "bf16"},
        "gradient_clipping": cfg.grad_clip, "steps_per_print": 10 ** 9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=client_opt, config=ds_config)
    manifold = ShardedManifoldStep(engine, model, cfg)
    dtype = torch.bfloat16 if args.mode == "bf16" else torch.float32
    per = GLOBAL_BATCH // world
    named = dict(model.named_parameters())

    def train_step(step: int, poison: bool = False) -> bool:
        x, y = batch(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = F.cross_entropy(engine(x.to(dtype)).float() * 10.0, y)
        engine.backward(loss)
        if poison and rank == 0:
            p = named[manifold_names[0]]
            safe_set_local_grad(p, torch.full((p.ds_tensor.numel(),), float("nan")))
        if step in SYNC_STEPS:
            manifold.request_lookahead_sync()  # manifold matrices and DeepSpeed's client optimizer alike
        applied = manifold.step()
        engine.step()
        return applied

    def full_masters() -> dict[str, torch.Tensor]:
        return {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}

    per_step_counts = []
    for step in range(args.steps):
        assert train_step(step)
        per_step_counts.append(manifold.stats["retractions"])
    result = {"rank": rank, "world": world, "mode": args.mode, "owned": [s.name for s in manifold.owned],
              "per_step_counts": per_step_counts, "retraction_counts": manifold.retraction_counts,
              "manifold_names": manifold_names, "grad_norm_last": float(manifold.stats["grad_norm"]),
              "rounds": manifold.stats["rounds"], "owners": manifold.owner_map()}

    state = manifold.state_dict()  # this rank's matrices only, no collective
    result["state_names"] = sorted(state["manifold"])
    result["state_bytes"] = sum(v.numel() * v.element_size() for e in state["manifold"].values() for v in e.values())
    torch.save(state, out / f"manifold_state_rank{rank}.pt")
    masters = full_masters()  # collective
    result["max_orth_error_collective"] = manifold.max_orthogonality_error()
    result["max_orth_error_gathered"] = max(orthogonality_error(masters[n]) for n in manifold_names)
    # The bf16 (or fp32) module copy must be the rounding of the fp32 master: gather it and compare.
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        result["module_vs_master_max_diff"] = max(
            float((p.detach().float() - masters[n].to(p.dtype).float()).abs().max()) for n, p in model.named_parameters())
        result["module_dtype"] = str(next(model.parameters()).dtype)
    result["adam_state_for_manifold"] = any(
        len(engine.optimizer.optimizer.state.get(p, {})) > 0
        for g in engine.optimizer.optimizer.param_groups if g.get("manifold") for p in g["params"])
    if rank == 0:
        torch.save(masters, out / "weights_k.pt")

    assert train_step(args.steps)
    masters_next = full_masters()
    if rank == 0:
        torch.save(masters_next, out / "weights_k1.pt")

    result["nan_step_applied"] = train_step(args.steps + 1, poison=True)
    after_nan = full_masters()
    result["nan_manifold_unchanged"] = all(torch.equal(after_nan[n], masters_next[n]) for n in manifold_names)
    result["skipped_steps"] = manifold.skipped_steps
    result["step_count"] = manifold.step_count
    result["retraction_counts"] = dict(manifold.retraction_counts)

    # Resume 1 -> 2: the state and weights of a one-process run after `steps` steps, loaded into this 2-rank
    # engine (each rank keeps its owned matrices' state), then one more step.
    from deepspeed.utils import safe_set_local_fp32_param

    from lipnext_scale.optim.partition import partition_of

    init = build_model().state_dict()
    sp_model, sp_opt = single_process(init, range(args.steps))
    weights = sp_model.state_dict()
    for n, p in named.items():
        local = partition_of(weights[n].float(), rank, world)
        safe_set_local_fp32_param(p, local)
        p.ds_tensor.data.copy_(local.to(p.ds_tensor.dtype))  # the module copy too (see ckpt/zero.py)
    manifold.load_state_dict(sp_opt.state_dict())
    result["resume12_state_names"] = sorted(manifold.state)
    assert train_step(args.steps)
    resumed = full_masters()
    if rank == 0:
        torch.save(resumed, out / "weights_resume12.pt")
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
    # Results are written; skip the interpreter's teardown, where a C++ thread of the distributed stack
    # intermittently aborts ("terminate called without an active exception", exit 134) after all the work
    # is done (seen once in CI on this worker; cf. lipnext_scale/data/manifest.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
