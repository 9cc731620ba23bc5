"""The README's generated tables agree with the committed results (bench/readme_tables.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _tables():
    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "bench" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_the_results_files():
    tables = _tables()
    readme = (REPO / "README.md").read_text()
    assert tables.render(readme) == readme, "README.md's tables differ from bench/results: python bench/readme_tables.py"


def test_a_changed_figure_is_caught(tmp_path):
    tables = _tables()
    result = json.loads((REPO / "bench" / "results" / "ablation.json").read_text())
    readme = tables.render((REPO / "README.md").read_text())
    result["variants"]["paper"]["summary"]["clean"]["mean"] += 0.01  # one point of clean accuracy
    (tmp_path / "ablation.json").write_text(json.dumps(result))
    assert tables.render(readme, tmp_path) != readme


def test_an_unlabelled_variant_and_missing_markers_are_one_line_errors(tmp_path):
    tables = _tables()
    result = json.loads((REPO / "bench" / "results" / "ablation.json").read_text())
    result["variants"]["brand_new"] = result["variants"]["paper"]
    (tmp_path / "ablation.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match="brand_new.*ABLATION_ROWS"):
        tables.render((REPO / "README.md").read_text(), tmp_path)
    with pytest.raises(ValueError, match="lacks the markers"):
        tables.render("no tables here")
