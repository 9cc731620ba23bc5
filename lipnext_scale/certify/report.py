"""Reports of a certification job: merged per-sample parquet, report.json, a PNG plot, a terminal table.

Everything here is computed from the merged per-sample table, so a resumed job (some shards from an
earlier run) reports exactly what a single uninterrupted run would.
"""

from __future__ import annotations

import io
import json
import platform
import posixpath
import sys

import fsspec
import numpy as np

from lipnext_scale.certify.certify import format_eps
from lipnext_scale.certify.model_loading import CertifyError
from lipnext_scale.certify.worker import (
    broken_column, certified_column, shard_result_url, write_parquet_atomic,
)

SAMPLES_FILE = "samples.parquet"
REPORT_FILE = "report.json"
PLOT_FILE = "certified_accuracy.png"


def versions() -> dict[str, str]:
    import pyarrow
    import torch

    import lipnext_scale

    out = {"lipnext_scale": lipnext_scale.__version__, "torch": torch.__version__, "pyarrow": pyarrow.__version__,
           "python": sys.version.split()[0], "platform": platform.platform()}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency, but reports must not need it
        pass
    return out


def merge_shard_tables(out_url: str, shard_urls: list[str]):
    """Concatenate the per-shard parquet files in shard order; each (shard, key) must appear once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for shard in shard_urls:
        fs, path = fsspec.core.url_to_fs(shard_result_url(out_url, shard))
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(io.BytesIO(f.read()), use_threads=False))
    table = pa.concat_tables(tables, promote_options="default")
    ids = [f"{s}/{k}" for s, k in zip(table.column("shard").to_pylist(), table.column("key").to_pylist())]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise CertifyError(f"sample {dup!r} appears more than once in the results; two shards share a name "
                           "or a shard repeats a key: fix the data set")
    return table


def soundness_alarms(table, eps_list: list[float]) -> list[dict]:
    """Certified points the attack broke: each one is a false certificate (must never happen)."""
    alarms = []
    for eps in eps_list:
        col = broken_column(eps)
        if col not in table.column_names:
            continue
        cert = np.asarray(table.column(certified_column(eps)).to_numpy(zero_copy_only=False), dtype=bool)
        broken = np.asarray(table.column(col).to_numpy(zero_copy_only=False), dtype=bool)
        for i in np.nonzero(cert & broken)[0]:
            alarms.append({"eps": format_eps(eps), "shard": table.column("shard")[int(i)].as_py(),
                           "key": table.column("key")[int(i)].as_py()})
    return alarms


def build_report(table, eps_list: list[float], *, verification: dict, checkpoint: dict, data: dict,
                 attack_steps: int, timing: dict) -> dict:
    n = table.num_rows
    if n == 0:
        raise CertifyError(f"the data ({data.get('url')!r}) holds no samples; nothing to certify")
    labels = table.column("label").to_numpy()
    correct = table.column("prediction").to_numpy() == labels
    report = {
        "samples": n,
        "clean_accuracy": float(correct.mean()),
        "eps": [format_eps(e) for e in eps_list],
        "certified_accuracy": {format_eps(e): float(np.asarray(
            table.column(certified_column(e)).to_numpy(zero_copy_only=False), dtype=bool).mean()) for e in eps_list},
        "lipschitz": verification,
        "checkpoint": checkpoint,
        "data": data,
        "timing": timing,
        "versions": versions(),
    }
    if verification.get("approx"):
        report["note"] = (f"weights are only approximately orthogonal: radii were divided by the rigorous "
                          f"Lipschitz bound {verification['lipschitz_used']:.6g} (--allow-approx)")
    if attack_steps > 0:
        alarms = soundness_alarms(table, eps_list)
        report["attack"] = {"method": "pgd-l2", "steps": attack_steps, "on": "certified points",
                            "broken_certified_points": len(alarms)}
        report["soundness_alarm"] = alarms
    return report


def plot_certified_accuracy(table, eps_list: list[float], title: str) -> bytes:
    """PNG bytes: certified accuracy against radius, the requested eps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    correct = table.column("prediction").to_numpy() == table.column("label").to_numpy()
    radius = np.where(correct, table.column("radius").to_numpy(), -np.inf)
    top = max(float(np.max(radius[np.isfinite(radius)], initial=0.0)), max(eps_list, default=0.0)) * 1.05 + 1e-6
    grid = np.linspace(0.0, top, 400)
    acc = (radius[None, :] > grid[:, None]).mean(axis=1)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(grid, acc, label="certified accuracy")
    for eps in eps_list:
        value = float((radius > eps).mean())
        ax.plot([eps], [value], "o")
        ax.annotate(f"{format_eps(eps)}: {100 * value:.1f}%", (eps, value), textcoords="offset points",
                    xytext=(5, 5))
    ax.set_xlabel("l2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(out_url: str, table, report: dict, eps_list: list[float]) -> None:
    from lipnext_scale.data.urls import atomic_write_bytes

    write_parquet_atomic(table, posixpath.join(out_url, SAMPLES_FILE))
    title = f"{report['checkpoint'].get('model', '')} ({report['samples']} samples)"
    atomic_write_bytes(posixpath.join(out_url, PLOT_FILE), plot_certified_accuracy(table, eps_list, title))
    atomic_write_bytes(posixpath.join(out_url, REPORT_FILE), json.dumps(report, indent=2).encode())


def format_table(report: dict) -> str:
    """The terminal summary."""
    lip = report["lipschitz"]
    lines = [f"samples: {report['samples']}   Lipschitz bound used: {lip['lipschitz_used']:.6g}"
             f"{'  (APPROXIMATE weights)' if lip.get('approx') else ''}   max orthogonality error: "
             f"{lip['max_orthogonality_error']:.2e}",
             f"{'eps':>10} {'certified acc':>14}" + (f" {'PGD breaks':>11}" if "attack" in report else ""),
             f"{'clean':>10} {100 * report['clean_accuracy']:>13.2f}%"]
    alarms = report.get("soundness_alarm", [])
    for eps in report["eps"]:
        row = f"{eps:>10} {100 * report['certified_accuracy'][eps]:>13.2f}%"
        if "attack" in report:
            row += f" {sum(a['eps'] == eps for a in alarms):>11d}"
        lines.append(row)
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)
