"""Reports of a certification job: merged per-sample parquet, report.json, a PNG plot, a terminal table,
and the one reader of a report.json (`read_report`: retention's score, serve's GET /model, the run summary).

Everything here is computed from the merged per-sample table, so a resumed job (some shards from an
earlier run) reports exactly what a single uninterrupted run would. Every file is read and written
through `lipnext_scale.storage` (written atomically: never half a file under its final name).
"""

from __future__ import annotations

import io
import math

import numpy as np

from lipnext_scale.certify.model_loading import CertifyError
from lipnext_scale.certify.worker import (
    ATTACK_DISTANCE, RADIUS_EXACT, Checks, broken_column, certified_column, shard_result_url, write_parquet_atomic,
)
from lipnext_scale.ckpt.layout import REPORT_FILE, RunLayout
from lipnext_scale.ckpt.retention import UnreadableScore
from lipnext_scale.eps import format_eps
from lipnext_scale.storage import atomic_write_bytes, join_url, read_bytes, read_json, versions, write_json

SAMPLES_FILE = "samples.parquet"
PLOT_FILE = "certified_accuracy.png"


def cra_key(eps: float) -> str:
    """The metric name of certified accuracy at `eps` ("cra_36_255"), in estimates and certificates alike."""
    return f"cra_{format_eps(eps).replace('/', '_')}"


def read_report(url: str, fix: str, error: type[Exception] = CertifyError, *,
                missing_ok: bool = False) -> dict | None:
    """The certification report at `url` (a report.json) as written; None when there is none and `missing_ok`.
    Anything else that is not a JSON object raises `error` naming the file and `fix`."""
    report = read_json(url, fix, error, missing_ok=missing_ok)
    if report is not None and not isinstance(report, dict):
        raise error(f"{url} holds a JSON {type(report).__name__}, not a certification report; {fix}")
    return report


def certified_score(run_url: str, step: int, eps: float | None) -> float | None:
    """Clean accuracy (eps None) or certified accuracy at `eps` from checkpoint `step`'s certification report
    (its in-run certification, `RunLayout.report`); None when there is no report (never certified, or given
    up). Raises UnreadableScore when a report is there but its figure cannot be read or is not finite.
    Retention ranks checkpoints by it (`Retention.score`)."""
    url = RunLayout(run_url).report(step)
    what = "clean_accuracy" if eps is None else f"certified_accuracy[{format_eps(eps)!r}]"
    report = read_report(url, f"{what} cannot be ranked: its checkpoint is kept", UnreadableScore, missing_ok=True)
    if report is None:
        return None
    try:
        value = float(report["clean_accuracy"] if eps is None else report["certified_accuracy"][format_eps(eps)])
    except (ValueError, KeyError, TypeError) as e:
        raise UnreadableScore(f"{url}: {what} unreadable ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not math.isfinite(value):
        raise UnreadableScore(f"{url}: the score is {value}, not a finite number")
    return value


def read_shard_result(url: str):
    """One shard's result table; a file that is cut short or damaged raises CertifyError (the job then
    certifies that shard again)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_bytes(url, CertifyError)
    try:
        return pq.read_table(io.BytesIO(data), use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__  # one line whatever pyarrow says
        raise CertifyError(f"shard result {url!r} is unreadable ({len(data)} bytes: {reason})") from None


def merge_shard_tables(out_url: str, shard_urls: list[str]):
    """Concatenate the per-shard parquet files in shard order; each (shard, key) must appear once."""
    import pyarrow as pa

    tables = [read_shard_result(shard_result_url(out_url, shard)) for shard in shard_urls]
    table = pa.concat_tables(tables, promote_options="default")
    ids = [f"{s}/{k}" for s, k in zip(table.column("shard").to_pylist(), table.column("key").to_pylist())]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise CertifyError(f"sample {dup!r} appears more than once in the results; two shards share a name "
                           "or a shard repeats a key: fix the data set")
    return table


def _column(table, name: str, dtype=None) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=dtype)


def soundness_alarms(table, eps_list: list[float]) -> list[dict]:
    """Certified points an attack broke: each one is a false certificate (must never happen). PGD: its
    per-eps flags. FMN: an adversarial example at distance <= eps of a point certified at eps, or at
    distance < radius of any correctly classified point (eps "radius")."""
    alarms = []

    def add(eps_label: str, rows) -> None:
        for i in rows:
            alarms.append({"eps": eps_label, "shard": table.column("shard")[int(i)].as_py(),
                           "key": table.column("key")[int(i)].as_py()})

    for eps in eps_list:
        cert = _column(table, certified_column(eps), bool)
        if broken_column(eps) in table.column_names:
            add(format_eps(eps), np.nonzero(cert & _column(table, broken_column(eps), bool))[0])
        if ATTACK_DISTANCE in table.column_names:
            add(format_eps(eps), np.nonzero(cert & (_column(table, ATTACK_DISTANCE, float) <= eps))[0])
    if ATTACK_DISTANCE in table.column_names:
        correct = _column(table, "prediction") == _column(table, "label")
        radius, dist = _column(table, "radius", float), _column(table, ATTACK_DISTANCE, float)
        add("radius", np.nonzero(correct & (radius > 0) & (dist < radius))[0])
    return alarms


def empirical_robust_accuracy(table, eps_list: list[float]) -> dict[str, float]:
    """Per eps: correct and no adversarial example found within eps (an upper bound on robust accuracy)."""
    correct = _column(table, "prediction") == _column(table, "label")
    dist = _column(table, ATTACK_DISTANCE, float)
    return {format_eps(e): float((correct & (dist > e)).mean()) for e in eps_list}


def min_distance_over_radius(table) -> dict | None:
    """The smallest attack distance / certified radius over correct points with radius > 0 (> 1 iff no
    attack came inside a certificate), with the point it was found at."""
    correct = _column(table, "prediction") == _column(table, "label")
    radius, dist = _column(table, "radius", float), _column(table, ATTACK_DISTANCE, float)
    ok = correct & (radius > 0) & np.isfinite(radius) & np.isfinite(dist)
    if not ok.any():
        return None
    ratio = np.where(ok, dist / np.where(ok, radius, 1.0), np.inf)
    i = int(np.argmin(ratio))
    return {"ratio": float(ratio[i]), "distance": float(dist[i]), "radius": float(radius[i]),
            "shard": table.column("shard")[i].as_py(), "key": table.column("key")[i].as_py(),
            "points": int(ok.sum())}


def build_report(table, checks: Checks, *, verification: dict, checkpoint: dict, data: dict, timing: dict,
                 floating_point: dict | None = None) -> dict:
    eps_list, attack_steps, attack = checks.eps_list, checks.attack_steps, checks.attack
    n = table.num_rows
    if n == 0:
        raise CertifyError(f"the data ({data.get('url')!r}) holds no samples; nothing to certify")
    labels = table.column("label").to_numpy()
    correct = table.column("prediction").to_numpy() == labels
    report = {
        "samples": n,
        "clean_accuracy": float(correct.mean()),
        "eps": [format_eps(e) for e in eps_list],
        "certified_accuracy": {format_eps(e): float(_column(table, certified_column(e), bool).mean())
                               for e in eps_list},
        "lipschitz": verification,
        "checkpoint": checkpoint,
        "data": data,
        "timing": timing,
        "versions": versions(),
    }
    if RADIUS_EXACT in table.column_names:
        # What the floating-point allowances cost: CRA had the radius been computed in exact arithmetic.
        exact = correct & np.isfinite(_column(table, RADIUS_EXACT, float))
        exact_radius = _column(table, RADIUS_EXACT, float)
        report["floating_point"] = {
            **(floating_point or {}),
            "certified_accuracy_exact_arithmetic": {format_eps(e): float((exact & (exact_radius > e)).mean())
                                                    for e in eps_list}}
    if verification.get("approx"):
        report["note"] = (f"weights are only approximately orthogonal: radii were divided by the rigorous "
                          f"Lipschitz bound {verification['lipschitz_used']:.6g} (--allow-approx)")
    if attack_steps > 0:
        alarms = soundness_alarms(table, eps_list)
        if attack == "fmn":
            report["attack"] = {"method": "foolbox-3.3 l2 FMN + DDN, smallest distance per point",
                                "steps": attack_steps, "on": "all correctly classified points",
                                "broken_certified_points": len(alarms),
                                "empirical_robust_accuracy": empirical_robust_accuracy(table, eps_list),
                                "min_distance_over_radius": min_distance_over_radius(table)}
        else:
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
    ax.plot(grid, acc, label="certified accuracy (lower bound)")
    if ATTACK_DISTANCE in table.column_names:
        dist = np.where(correct, _column(table, ATTACK_DISTANCE, float), -np.inf)
        ax.plot(grid, (dist[None, :] > grid[:, None]).mean(axis=1), "--",
                label="empirical robust accuracy, FMN/DDN (upper bound)")
        ax.legend(loc="upper right", fontsize=8)
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
    """samples.parquet, the plot, then report.json last: a report on disk means the rest is there too."""
    write_parquet_atomic(table, join_url(out_url, SAMPLES_FILE))
    title = f"{report['checkpoint'].get('model', '')} ({report['samples']} samples)"
    atomic_write_bytes(join_url(out_url, PLOT_FILE), plot_certified_accuracy(table, eps_list, title), CertifyError)
    write_json(join_url(out_url, REPORT_FILE), report, CertifyError)


def format_table(report: dict) -> str:
    """The terminal summary."""
    lip = report["lipschitz"]
    fmn = "empirical_robust_accuracy" in report.get("attack", {})
    lines = [f"samples: {report['samples']}   Lipschitz bound used: {lip['lipschitz_used']:.6g}"
             f"{'  (APPROXIMATE weights)' if lip.get('approx') else ''}   max orthogonality error: "
             f"{lip['max_orthogonality_error']:.2e}",
             f"{'eps':>10} {'certified acc':>14}" + (f" {'attack breaks':>13}" if "attack" in report else "")
             + (f" {'empirical robust acc':>21}" if fmn else ""),
             f"{'clean':>10} {100 * report['clean_accuracy']:>13.2f}%"]
    alarms = report.get("soundness_alarm", [])
    for eps in report["eps"]:
        row = f"{eps:>10} {100 * report['certified_accuracy'][eps]:>13.2f}%"
        if "attack" in report:
            row += f" {sum(a['eps'] == eps for a in alarms):>13d}"
        if fmn:
            row += f" {100 * report['attack']['empirical_robust_accuracy'][eps]:>20.2f}%"
        lines.append(row)
    if fmn and report["attack"].get("min_distance_over_radius"):
        m = report["attack"]["min_distance_over_radius"]
        lines.append(f"smallest attack distance / certified radius: {m['ratio']:.4g} over {m['points']} points "
                     "(> 1: no attack came inside a certificate)")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)
