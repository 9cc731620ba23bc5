"""What `GET /model` says: the model, its verified Lipschitz bound, and its certification report if one
sits beside the checkpoint and is about these very weights.

Beside means: `--report URL` when given; else `{checkpoint}/report.json` (an export certified with its
report copied in); else, for a training checkpoint `{run}/step_X`, the report its run's in-training
certification wrote (`{run}/certify/step_X/report.json`). A report whose weights_sha256 is not the served
weights' is named but not shown: it describes other weights.
"""

from __future__ import annotations

import math

from lipnext_scale.certify.model_loading import CertifyError, LoadedModel, Verification


def report_candidates(loaded: LoadedModel) -> list[str]:
    from lipnext_scale.ckpt.layout import REPORT_FILE, RunLayout
    from lipnext_scale.storage import join_url

    candidates = [join_url(loaded.url, REPORT_FILE)]
    in_run = RunLayout.of_checkpoint(loaded.url) if loaded.kind == "training" else None
    if in_run:
        run, step = in_run
        candidates.append(run.report(step))
    return candidates


def find_report(loaded: LoadedModel, report_url: str | None) -> dict | None:
    """{"url", "report"} of the certification report beside the checkpoint, {"url", "ignored"} when it
    describes other weights or cannot be read, None when there is none. An explicit --report that is
    missing is an error."""
    from lipnext_scale.certify.report import read_report
    from lipnext_scale.storage import exists

    if report_url is not None and not exists(report_url, CertifyError):
        raise CertifyError(f"--report {report_url!r} does not exist; pass a `lipnext certify` report.json")
    for url in [report_url] if report_url else report_candidates(loaded):
        if not exists(url, CertifyError):
            continue
        try:
            report = read_report(url, "certify the served model again")
            sha = report["checkpoint"]["weights_sha256"]
        except (CertifyError, KeyError, TypeError) as e:
            return {"url": url, "ignored": f"unreadable ({type(e).__name__}: {' '.join(str(e).split())})"}
        if sha != loaded.weights_sha256:
            return {"url": url, "ignored": f"it certifies other weights (weights_sha256 {str(sha)[:12]}..., "
                                           f"served {loaded.weights_sha256[:12]}...)"}
        return {"url": url, "report": report}
    return None


def json_safe(value):
    """Non-finite floats -> None, recursively: GET /model answers strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def describe_model(loaded: LoadedModel, verification: Verification, floating_point: dict, eps: list[float],
                   report: dict | None) -> dict:
    from lipnext_scale.eps import format_eps

    spec = loaded.model.spec
    return json_safe({
        "model": loaded.config["model"],
        "input": {"shape": [3, spec.image_size, spec.image_size], "range": [0.0, 1.0],
                  "accepts": "PNG or JPEG bytes of exactly this size, or a JSON array (3, H, W); never resized"},
        "num_classes": spec.num_classes,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "checkpoint": {"url": loaded.url, "kind": loaded.kind},
        "weights_sha256": loaded.weights_sha256,
        "lipschitz_bound": verification.lipschitz_bound,
        "lipschitz": verification.as_dict(),
        "floating_point": floating_point,
        "eps": [format_eps(e) for e in eps],
        "certification_report": report,
    })
