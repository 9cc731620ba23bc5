"""One rank of the real DeepSpeed ZeRO-3 run behind tests/integration/test_sharded_optim.py.

Spawned by the test with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set; writes its findings to
OUT/result_rank{rank}.json and (rank 0) the tensors the test compares with a single-process run.
Everything here is real: DeepSpeed on CPU (gloo), ZeRO-3 partitioned fp32 masters, bf16 or fp32 compute.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

# Shared with the test: the model, optimizer config and data both sides use.
MODEL_KW = dict(image_size=12, patch_size=3, width=21, expansion=3, depth=2)  # odd sizes: padded partitions
GLOBAL_BATCH = 8


def optim_config():
    from lipnext_scale.config import OptimConfig

    return OptimConfig(lr=0.2, momentum=0.9, retraction="polar_ns", reortho_every=3, euclid_lr=1e-2,
                       warmup_steps=1, total_steps=10, grad_clip=0.5,
                       manifold_bucket_mb=0.006)  # ~1.5k floats: several gather/scatter rounds per step


def build_model():
    from lipnext_scale.model import create_model

    torch.manual_seed(0)
    return create_model("lipnext-tiny", **MODEL_KW)


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.rand(GLOBAL_BATCH, 3, 12, 12, generator=gen), torch.randint(0, 10, (GLOBAL_BATCH,), generator=gen)


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

    deepspeed.init_distributed(dist_backend="gloo")
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
              "manifold_names": manifold_names, "grad_norm_last": manifold.stats["grad_norm"],
              "rounds": manifold.stats["rounds"]}

    state = manifold.state_dict()  # collective; complete on rank 0
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
        torch.save(state, out / "manifold_state.pt")
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
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
