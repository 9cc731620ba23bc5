"""One certification worker: load and verify the model once, then certify whole shards.

Used in-process (`actors=0`) and as a Ray actor (job.py wraps `ShardCertifier` with `ray.remote`), so
both paths run exactly the same code (an actor, a process of its own, also keeps freed memory:
`keep_freed_memory`). Each shard's per-sample results go to one parquet file written under a temporary
name and renamed: a file the job wrote is complete, which is what resume relies on (one damaged outside
the job is found unreadable by job.py, certified again and replaced).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lipnext_scale.certify.attack import attack_breaks, fmn_l2_distances
from lipnext_scale.certify.certify import certified_radius, head_logits64, model_pair_distances
from lipnext_scale.certify.data_access import check_sample, checkpoint_dataset, iter_shard_samples, shard_name
from lipnext_scale.certify.fp_error import FloatErrorModel, batch_allowances, float_error_model
from lipnext_scale.certify.model_loading import CertifyError, load_model, verify_model
from lipnext_scale.eps import format_eps
from lipnext_scale.storage import atomic_write_bytes, join_url

ATTACK_DISTANCE = "attack_distance"  # --attack fmn: smallest adversarial l2 distance found (inf: none)
RADIUS_EXACT = "radius_exact_arithmetic"  # the radius without floating-point allowances, for comparison
RESULTS_DIR = "shards"  # {out}/shards/{shard name}.parquet: one result file per shard


def certified_column(eps: float) -> str:
    return f"certified@{format_eps(eps)}"


def broken_column(eps: float) -> str:
    return f"pgd_broken@{format_eps(eps)}"


def features_and_norms(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 features (the forward's own kernels) and the l2 norm of every block's input per sample (float64),
    which the floating-point allowances scale with. Pre-hooks read the norms; the model is not changed."""
    norms: list[torch.Tensor] = []

    def record(_module, args):
        norms.append(torch.linalg.vector_norm(args[0].detach().flatten(1), dim=1).to(torch.float64))

    hooks = [block.register_forward_pre_hook(record) for block in model.blocks]
    try:
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            features = model.features(images.to(torch.float32))
    finally:
        for hook in hooks:
            hook.remove()
    return features, norms


def certify_logits(model: torch.nn.Module, images: torch.Tensor, lipschitz: float, pair_distances: torch.Tensor,
                   fp_model: FloatErrorModel) -> dict[str, torch.Tensor]:
    """Per-sample float64 logits, prediction, margin, radius and radius_exact_arithmetic of one batch: the
    one code path of every radius we state (the job's shards, `lipnext serve`'s answers). One forward."""
    features, block_norms = features_and_norms(model, images)
    logits = head_logits64(features, model.head.rows(), model.head.bias)
    pred, margin, radius_exact = certified_radius(logits, pair_distances, lipschitz)
    # fp32 norms (here and of the block inputs) are off by far less than the 1e-4 relative we add
    input_norm = (images.to(torch.float32) - model.input_mean.to(images.device)).flatten(1).norm(dim=1)
    input_norm = input_norm.to(torch.float64) * (1 + 1e-4)
    allow = batch_allowances(fp_model, input_norm.cpu(), [n.cpu() * (1 + 1e-4) for n in block_norms],
                             features.cpu().to(torch.float64).norm(dim=1), radius_exact.cpu())
    on = logits.device
    _, _, radius = certified_radius(logits, pair_distances, lipschitz, gap_error=allow.gap_error.to(on),
                                    sample_gap_error=allow.sample_gap_error.to(on),
                                    feature_error=allow.feature_error.to(on))
    return {"logits": logits, "prediction": pred, "margin": margin, "radius": radius,
            RADIUS_EXACT: radius_exact}


@dataclass(frozen=True)
class Checks:
    """What is computed per sample besides the radius: certified@eps for each radius of `eps_list` (parsed
    once, where the job starts) and, when attack_steps > 0, an attack looking for counterexamples:
    pgd_broken@eps for the certified points (`attack="pgd"`, False elsewhere) or attack_distance for every
    point (`attack="fmn"`)."""

    eps_list: list[float]
    attack_steps: int = 0
    attack: str = "pgd"


@dataclass(frozen=True)
class CertifierProcess:
    """Facts of the process a `ShardCertifier` runs in: its torch `device`, its torch `threads` (0: leave
    torch's setting) and whether it is a process of its own (a Ray actor or Serve replica), which may tune
    the allocator (`keep_freed_memory`)."""

    device: str = "cpu"
    threads: int = 0
    own_process: bool = False


def certify_batch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, checks: Checks,
                  lipschitz: float, pair_distances: torch.Tensor | None = None, *,
                  fp_model: FloatErrorModel | None = None) -> dict[str, torch.Tensor]:
    """Per-sample prediction, margin, radius, radius_exact_arithmetic and the `checks` (certified@eps,
    pgd_broken@eps or attack_distance).

    Features in fp32, head in float64 from them with the forward's rows (`head_logits64`); the radius
    subtracts the floating-point allowances of `fp_error`, so it certifies `model(x).argmax()` as it
    runs in fp32. `pair_distances` and `fp_model` are computed here when not given; callers that
    certify many batches pass them once (for 1000 classes pair_distances is a 1000 x 1000 x width
    float64 computation)."""
    if pair_distances is None:
        pair_distances = model_pair_distances(model)
    if fp_model is None:
        fp_model = float_error_model(model, lipschitz)
    out = certify_logits(model, images, lipschitz, pair_distances, fp_model)
    del out["logits"]  # not a per-sample result column
    pred, radius = out["prediction"], out["radius"]
    labels = labels.to(pred.device)
    eps_list, attack_steps, attack = checks.eps_list, checks.attack_steps, checks.attack
    for eps in eps_list:
        certified = (pred == labels) & (radius > eps)
        out[certified_column(eps)] = certified
        if attack_steps > 0 and attack == "pgd":
            broken = torch.zeros_like(certified)
            idx = certified.nonzero().squeeze(1)
            if idx.numel():
                broken[idx] = attack_breaks(model, images[idx], labels[idx], eps, steps=attack_steps)
            out[broken_column(eps)] = broken
    if attack_steps > 0 and attack == "fmn":
        out[ATTACK_DISTANCE] = fmn_l2_distances(model, images, labels, steps=attack_steps)
    return out


def write_parquet_atomic(table, url: str) -> None:
    """Write a pyarrow table to `url` via a temporary sibling and a rename."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(url, buf.getvalue(), CertifyError)


def shard_result_url(out_url: str, shard_url: str) -> str:
    return join_url(out_url, RESULTS_DIR, f"{shard_name(shard_url)}.parquet")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS (True if it took).

    Where the actor path's 10-19 % went (issue 15): a fresh actor process starts with glibc's default
    thresholds, so every batch's activations (a few MB each) were mmapped, or grew and trimmed the heap,
    and freed again: ~110k minor page faults per 3,000 images on lipnext-tiny against ~16k with this,
    and the zeroing of every faulted page on the certifying core. The long-lived process of an
    in-process run had its thresholds raised already by earlier large frees. M_MMAP_THRESHOLD = 32 MiB
    (glibc's maximum) and M_TRIM_THRESHOLD = 1 GiB; larger allocations are still mmapped, and a process
    keeps at most its peak working set. Process-wide, so only called in processes the job owns (actors)."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False


class ShardCertifier:
    """Holds one verified model; `certify_shard` may be called for any number of shards."""

    def __init__(self, ckpt_url: str, checks: Checks, *, batch_size: int, lipschitz_tol: float, allow_approx: bool,
                 process: CertifierProcess = CertifierProcess(), expected_sha256: str | None = None):
        device = process.device
        if process.threads > 0:
            torch.set_num_threads(process.threads)
        self.allocator_tuned = keep_freed_memory() if process.own_process else False
        if str(device).startswith("cuda"):
            # TF32 matmuls keep 10 mantissa bits: logits (hence margins) would be ~1e-3 off, enough to
            # certify a point that is not robust. Certification runs in true fp32 (process-wide setting).
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.loaded = load_model(ckpt_url, device=device)
        if expected_sha256 is not None and self.loaded.weights_sha256 != expected_sha256:
            raise CertifyError(f"checkpoint {ckpt_url!r} changed while the job was starting (weights hash "
                               f"{self.loaded.weights_sha256[:12]} != {expected_sha256[:12]}); rerun the job")
        self.verification = verify_model(self.loaded.model, lipschitz_tol, allow_approx)
        self.checks, self.batch_size = checks, batch_size
        self.eps_list, self.attack_steps, self.attack = checks.eps_list, checks.attack_steps, checks.attack
        self.device = torch.device(device)
        spec = self.loaded.model.spec
        self.image_size, self.num_classes = spec.image_size, spec.num_classes
        self.dataset = checkpoint_dataset(self.loaded.config)  # fixes the evaluation view (a centre crop or none)
        self.pair_distances = model_pair_distances(self.loaded.model)  # once per model
        self.fp_model = float_error_model(self.loaded.model, self.verification.lipschitz_used)
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay one-time costs at startup, not inside the first shard: lazy imports (pyarrow's pandas shim
        alone is ~0.5 s, the tar reader, PIL) and the first forward/backward's kernel setup."""
        import pyarrow as pa

        import lipnext_scale.data.tar_reader  # noqa: F401
        import lipnext_scale.data.transforms  # noqa: F401

        pa.table({"key": pa.array([], pa.string())})
        images = torch.full((2, 3, self.image_size, self.image_size), 0.5, device=self.device)
        warm_up = Checks(self.eps_list[:1], attack_steps=min(self.attack_steps, 1), attack=self.attack)
        certify_batch(self.loaded.model, images, torch.zeros(2, dtype=torch.long), warm_up,
                      self.verification.lipschitz_used, pair_distances=self.pair_distances, fp_model=self.fp_model)

    def column_names(self) -> list[str]:
        names = ["prediction", "margin", "radius", RADIUS_EXACT]
        pgd = self.attack_steps > 0 and self.attack == "pgd"
        for eps in self.eps_list:
            names += [certified_column(eps)] + ([broken_column(eps)] if pgd else [])
        return names + ([ATTACK_DISTANCE] if self.attack_steps > 0 and self.attack == "fmn" else [])

    def info(self) -> dict:
        return {"weights_sha256": self.loaded.weights_sha256, **self.verification.as_dict(),
                "floating_point": self.fp_model.as_dict()}

    def certify_shard(self, shard_url: str, out_url: str) -> dict:
        """Certify every sample of one shard and write its parquet file; returns {shard, samples,
        cpu_seconds} (this process's CPU time: a throughput measure that a busy machine does not skew)."""
        import time

        import pyarrow as pa

        cpu_started, thread_started, wall_started = time.process_time(), time.thread_time(), time.perf_counter()
        columns: dict[str, list] = {"key": [], "label": []}
        batch_keys, batch_images, batch_labels = [], [], []

        def flush() -> None:
            images = torch.stack(batch_images).to(self.device)
            labels = torch.tensor(batch_labels, dtype=torch.long)
            result = certify_batch(self.loaded.model, images, labels, self.checks,
                                   self.verification.lipschitz_used, self.pair_distances, fp_model=self.fp_model)
            columns["key"] += batch_keys
            columns["label"] += batch_labels
            for name, values in result.items():
                columns.setdefault(name, []).extend(values.cpu().tolist())
            for pending in (batch_keys, batch_images, batch_labels):
                pending.clear()

        for key, image, label in iter_shard_samples(shard_url):
            image = check_sample(shard_url, key, image, label, self.image_size, self.num_classes, self.dataset)
            batch_keys.append(key)
            batch_images.append(image)
            batch_labels.append(label)
            if len(batch_keys) == self.batch_size:
                flush()
        if batch_keys:
            flush()
        for name in self.column_names():  # an empty shard still gets every column
            columns.setdefault(name, [])
        n = len(columns["key"])
        table = pa.table({"shard": [shard_name(shard_url)] * n, **columns})
        write_parquet_atomic(table, shard_result_url(out_url, shard_url))
        return {"shard": shard_url, "samples": n, "cpu_seconds": time.process_time() - cpu_started,
                "thread_cpu_seconds": time.thread_time() - thread_started,
                "wall_seconds": time.perf_counter() - wall_started}
