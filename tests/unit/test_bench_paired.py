"""bench/paired.py: the one summary every bench writes under "comparisons" (issue 23)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _paired():
    spec = importlib.util.spec_from_file_location("paired", REPO / "bench" / "paired.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_of_per_round_ratios_not_ratio_of_medians():
    # per round 2/1, 1/4, 9/3: ratios 2, 0.25, 3 (median 2); the ratio of medians would be 3/3 = 1
    c = _paired().comparison("t", [2.0, 1.0, 9.0], [1.0, 4.0, 3.0], target=1.5)
    assert c["per_round"] == [2.0, 0.25, 3.0]
    assert (c["median"], c["min"], c["max"], c["rounds"]) == (2.0, 0.25, 3.0, 3)
    assert c["target"] == 1.5 and c["target_met"] is True
    assert c["what"] == "t (higher is better)"
    assert set(c) == {"what", "median", "min", "max", "rounds", "per_round", "target", "target_met"}


def test_target_direction_and_no_target():
    paired = _paired()
    lower = paired.comparison("t", [1.5, 1.3], [1.0, 1.0], target=1.3, higher_is_better=False)
    assert lower["target_met"] is False and lower["what"].endswith("(lower is better)")
    assert paired.comparison("t", [1.0], [1.0], target=1.0, higher_is_better=False)["target_met"] is True
    none = paired.comparison("t", [1.0], [2.0])
    assert none["target"] is None and none["target_met"] is None
    assert paired.comparison("t", [3.0], [2.0], higher_is_better=None)["what"].endswith("(1 is best)")


def test_bad_rounds_are_one_line_errors():
    paired = _paired()
    with pytest.raises(ValueError, match="2 rounds of ours against 1 of the alternative"):
        paired.comparison("t", [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no rounds measured"):
        paired.ratio_summary("t", [])
    with pytest.raises(ValueError, match="a target needs a direction"):
        paired.ratio_summary("t", [1.0], target=1.0, higher_is_better=None)


def test_paired_order_alternates():
    paired = _paired()
    assert paired.paired_order(0, ["a", "b", "c"]) == ["a", "b", "c"]
    assert paired.paired_order(1, ["a", "b", "c"]) == ["c", "b", "a"]
