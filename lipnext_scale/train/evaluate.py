"""Held-out clean and certified accuracy during training: an estimate, never a certificate.

Cheap and in the loop (every train.eval_every steps, train.eval_batches batches per rank), hence labelled
`estimate/*` in TensorBoard and the metrics: radii are divided by the monitoring bound from the fp32 masters'
orthogonality error (with bf16 the logits themselves are bf16). The certificate of each checkpoint is
`certify/*`: the certification job run on it while training goes on (`lipnext_scale.certify.during_training`).
Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank out of data
feeds a dummy batch.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from lipnext_scale.certify.certify import certified_mask, certified_radius, model_pair_distances
from lipnext_scale.certify.report import cra_key
from lipnext_scale.config import DataConfig
from lipnext_scale.model.lipschitz import lipschitz_from_orthogonality_error
from lipnext_scale.train.engine import WorkerRuntime

ESTIMATE = "estimate"  # the prefix of these metrics: not a certificate (those are `certify/*`)


@torch.no_grad()
def evaluate(built, data: DataConfig, *, image_size: int, radii: list[float], batches: int, loss_eps: float,
             runtime: WorkerRuntime) -> dict[str, float]:
    """Up to `batches` batches of `data.eval_url` per rank: estimate/clean_acc, estimate/cra_<eps> per radius."""
    import deepspeed

    from lipnext_scale.data.shards import LoaderRuntime, make_eval_loader

    if not data.eval_url:
        return {}
    engine, model = built.engine, built.model
    rank, world, device = runtime.rank, runtime.world, runtime.device
    lipschitz = lipschitz_from_orthogonality_error(built.manifold.max_orthogonality_error(), built.lipschitz_shapes)
    with deepspeed.zero.GatheredParameters([model.head.direction]):
        pair = model_pair_distances(model)
    engine.eval()
    it = iter(make_eval_loader(data.eval_url, replace(data, loader_processes=0), image_size=image_size,
                               num_classes=model.spec.num_classes, runtime=LoaderRuntime(rank=rank, world_size=world)))
    counts = torch.zeros(2 + len(radii), dtype=torch.float64, device=device)  # seen, correct, certified per eps
    for _ in range(batches):
        batch = next(it, None)
        have = torch.tensor([float(batch is not None)], device=device)
        dist.all_reduce(have)
        if have[0] == 0:
            break
        images, labels = ((batch[0], batch[1]) if batch is not None else
                          (torch.zeros(1, 3, image_size, image_size), torch.zeros(1, dtype=torch.long)))
        _, logits = engine(images.to(device, built.dtype), labels.to(device), loss_eps)
        if batch is None:
            continue
        pred, _, radius = certified_radius(logits.float().cpu(), pair, lipschitz)
        counts[0] += labels.numel()
        counts[1] += float((pred == labels).sum())
        counts[2:] += certified_mask(pred, radius, labels, radii).double().sum(0).to(device)
    dist.all_reduce(counts)
    engine.train()
    n = max(float(counts[0]), 1.0)
    out = {f"{ESTIMATE}/clean_acc": float(counts[1]) / n, f"{ESTIMATE}/samples": float(counts[0]),
           f"{ESTIMATE}/lipschitz_bound": lipschitz}
    for i, e in enumerate(radii):
        out[f"{ESTIMATE}/{cra_key(e)}"] = float(counts[2 + i]) / n
    return out
