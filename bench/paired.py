"""Paired comparisons, the one way every bench reports ours against what a user would pick instead (issue 23).

Ours and the alternative are measured back to back in the same round, the ratio is taken per round, and the
bench reports the median of those ratios with their spread and how many rounds it ran. A ratio of medians
hides rounds where ours lost; a paired ratio cancels load that drifts between rounds (a shared machine).

Every bench writes them under a top-level "comparisons" object, one entry per comparison:

    {"<name>": {"what": "...", "median": r, "min": r, "max": r, "rounds": n, "per_round": [...],
                "target": number or null, "target_met": bool or null}}

ratio = ours / alternative of one quantity; "what" names both and the quantity, and says whether higher or
lower is better; target_met compares the median with the target in that direction.
"""

from __future__ import annotations

import statistics
from typing import Sequence

DIGITS = 4


def paired_order(round_index: int, names: Sequence[str]) -> list[str]:
    """`names` in order on even rounds, reversed on odd ones: neither side of a pair always runs first."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def ratio_summary(what: str, per_round: Sequence[float], *, target: float | None = None,
                  higher_is_better: bool | None = True) -> dict:
    """One "comparisons" entry from per-round ratios ours / alternative. higher_is_better=None: a prediction
    against its measurement, where 1 is best (no one-sided target then)."""
    if not per_round:
        raise ValueError(f"comparison {what!r}: no rounds measured; run at least one round")
    if higher_is_better is None and target is not None:
        raise ValueError(f"comparison {what!r}: a target needs a direction; pass higher_is_better=True or False")
    median = statistics.median(per_round)
    met = None if target is None else bool(median >= target if higher_is_better else median <= target)
    better = {True: "higher is better", False: "lower is better", None: "1 is best"}[higher_is_better]
    return {"what": f"{what} ({better})",
            "median": round(median, DIGITS), "min": round(min(per_round), DIGITS),
            "max": round(max(per_round), DIGITS), "rounds": len(per_round),
            "per_round": [round(r, DIGITS) for r in per_round], "target": target, "target_met": met}


def comparison(what: str, ours: Sequence[float], alternative: Sequence[float], *, target: float | None = None,
               higher_is_better: bool | None = True) -> dict:
    """One "comparisons" entry from the same quantity measured for ours and the alternative in each round."""
    if len(ours) != len(alternative):
        raise ValueError(f"comparison {what!r}: {len(ours)} rounds of ours against {len(alternative)} of the "
                         "alternative; measure both in every round")
    return ratio_summary(what, [a / b for a, b in zip(ours, alternative)], target=target,
                         higher_is_better=higher_is_better)
