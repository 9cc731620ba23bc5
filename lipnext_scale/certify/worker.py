"""One certification worker: load and verify the model once, then certify whole shards.

Used in-process (`workers=0`) and as a Ray actor (job.py wraps `ShardCertifier` with `ray.remote`), so
both paths run exactly the same code. Each shard's per-sample results go to one parquet file written
under a temporary name and renamed: a file that exists is complete, which is what resume relies on.
"""

from __future__ import annotations

import posixpath

import torch

from lipnext_scale.certify.attack import attack_breaks
from lipnext_scale.certify.certify import certified_radius, format_eps, head_pair_distances
from lipnext_scale.certify.data_access import check_sample, iter_shard_samples, shard_name
from lipnext_scale.certify.model_loading import CertifyError, load_model, verify_model


def certified_column(eps: float) -> str:
    return f"certified@{format_eps(eps)}"


def broken_column(eps: float) -> str:
    return f"pgd_broken@{format_eps(eps)}"


def certify_batch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps_list: list[float],
                  lipschitz: float, attack_steps: int = 0,
                  pair_distances: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample prediction, margin, radius (float64 from fp32 logits), certified@eps and, when
    attack_steps > 0, pgd_broken@eps for the certified points (False elsewhere). `pair_distances`
    (from `head_pair_distances(model.head.weight)`) is computed here when not given; callers that certify
    many batches pass it once: for 1000 classes it is a 1000 x 1000 x width float64 computation."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        logits = model(images.to(torch.float32))
    if pair_distances is None:
        pair_distances = head_pair_distances(model.head.weight)
    pred, margin, radius = certified_radius(logits.double(), pair_distances, lipschitz=lipschitz)
    labels = labels.to(pred.device)
    out = {"prediction": pred, "margin": margin, "radius": radius}
    for eps in eps_list:
        certified = (pred == labels) & (radius > eps)
        out[certified_column(eps)] = certified
        if attack_steps > 0:
            broken = torch.zeros_like(certified)
            idx = certified.nonzero().squeeze(1)
            if idx.numel():
                broken[idx] = attack_breaks(model, images[idx], labels[idx], eps, steps=attack_steps)
            out[broken_column(eps)] = broken
    return out


def write_parquet_atomic(table, url: str) -> None:
    """Write a pyarrow table to `url` via a temporary sibling and a rename."""
    import io

    import pyarrow.parquet as pq

    from lipnext_scale.data.urls import atomic_write_bytes

    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(url, buf.getvalue())


def shard_result_url(out_url: str, shard_url: str) -> str:
    return posixpath.join(out_url.rstrip("/"), "shards", f"{shard_name(shard_url)}.parquet")


class ShardCertifier:
    """Holds one verified model; `certify_shard` may be called for any number of shards."""

    def __init__(self, ckpt_url: str, *, eps_list: list[float], batch_size: int, lipschitz_tol: float,
                 allow_approx: bool, attack_steps: int = 0, device: str = "cpu", threads: int = 0,
                 expected_sha256: str | None = None):
        if threads > 0:
            torch.set_num_threads(threads)
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
        self.eps_list, self.batch_size, self.attack_steps = eps_list, batch_size, attack_steps
        self.device = torch.device(device)
        spec = self.loaded.model.spec
        self.image_size, self.num_classes = spec.image_size, spec.num_classes
        self.pair_distances = head_pair_distances(self.loaded.model.head.weight)  # once per model
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay one-time costs at startup, not inside the first shard: lazy imports (pyarrow's pandas shim
        alone is ~0.5 s, the tar reader, PIL) and the first forward/backward's kernel setup."""
        import pyarrow as pa

        import lipnext_scale.data.tar_reader  # noqa: F401
        import lipnext_scale.data.transforms  # noqa: F401

        pa.table({"key": pa.array([], pa.string())})
        images = torch.full((2, 3, self.image_size, self.image_size), 0.5, device=self.device)
        certify_batch(self.loaded.model, images, torch.zeros(2, dtype=torch.long), self.eps_list[:1],
                      self.verification.lipschitz_used, attack_steps=min(self.attack_steps, 1),
                      pair_distances=self.pair_distances)

    def column_names(self) -> list[str]:
        names = ["prediction", "margin", "radius"]
        for eps in self.eps_list:
            names += [certified_column(eps)] + ([broken_column(eps)] if self.attack_steps > 0 else [])
        return names

    def info(self) -> dict:
        return {"weights_sha256": self.loaded.weights_sha256, **self.verification.as_dict()}

    def certify_shard(self, shard_url: str, out_url: str) -> dict:
        """Certify every sample of one shard and write its parquet file; returns {shard, samples,
        cpu_seconds} (this process's CPU time: a throughput measure that a busy machine does not skew)."""
        import time

        import pyarrow as pa

        cpu_started = time.process_time()
        columns: dict[str, list] = {"key": [], "label": []}
        batch_keys, batch_images, batch_labels = [], [], []

        def flush() -> None:
            images = torch.stack(batch_images).to(self.device)
            labels = torch.tensor(batch_labels, dtype=torch.long)
            result = certify_batch(self.loaded.model, images, labels, self.eps_list,
                                   self.verification.lipschitz_used, self.attack_steps, self.pair_distances)
            columns["key"] += batch_keys
            columns["label"] += batch_labels
            for name, values in result.items():
                columns.setdefault(name, []).extend(values.cpu().tolist())
            for pending in (batch_keys, batch_images, batch_labels):
                pending.clear()

        for key, image, label in iter_shard_samples(shard_url):
            check_sample(shard_url, key, image, label, self.image_size, self.num_classes)
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
        return {"shard": shard_url, "samples": n, "cpu_seconds": time.process_time() - cpu_started}
