"""The README's generated tables agree with the committed results (bench/readme_tables.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
PERF_TABLES = {"perf-model", "perf-certify", "perf-serve", "perf-data", "perf-train", "perf-rehearsal", "perf-optim"}


def _tables():
    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "bench" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _results_copy(tmp_path: Path) -> Path:
    shutil.copytree(RESULTS, tmp_path / "results")
    return tmp_path / "results"


def _edit(results: Path, file: str, change) -> None:
    data = json.loads((results / file).read_text())
    change(data)
    (results / file).write_text(json.dumps(data))


def _section(readme: str, name: str) -> str:
    return readme.split(f"<!-- {name} -->", 1)[1].split(f"<!-- /{name} -->", 1)[0]


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_tables_match_the_results_files():
    tables = _tables()
    readme = _readme()
    assert tables.render(readme) == readme, ("README.md's tables differ from bench/results: "
                                             "python bench/readme_tables.py")


def test_the_check_command_passes_on_the_committed_readme():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "readme_tables.py"), "--check"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_every_perf_table_has_its_markers_and_names_results_files_that_exist():
    tables, readme = _tables(), _readme()
    assert PERF_TABLES <= set(tables.TABLES)
    for name, (files, _) in tables.TABLES.items():
        assert f"<!-- {name} -->" in readme and f"<!-- /{name} -->" in readme, name
        for file in files:
            assert (RESULTS / file).is_file(), f"{name} reads bench/results/{file}, which does not exist"
    for name in PERF_TABLES:
        rows = [line for line in _section(readme, name).splitlines() if line.startswith("| ") and ".json`" in line]
        assert rows, f"{name} has no rows"
        for line in rows:
            file = re.search(r"`([\w.-]+\.json)`", line.split(" | ")[3]).group(1)
            assert (RESULTS / file).is_file(), f"{name} row names bench/results/{file}, which does not exist"


def test_a_changed_figure_is_caught(tmp_path):
    tables = _tables()
    readme = tables.render(_readme())
    results = _results_copy(tmp_path)
    _edit(results, "ablation.json", lambda r: r["variants"]["paper"]["summary"]["clean"].__setitem__(
        "mean", r["variants"]["paper"]["summary"]["clean"]["mean"] + 0.01))  # one point of clean accuracy
    assert tables.render(readme, results) != readme
    results = _results_copy(tmp_path / "again")
    _edit(results, "serve.json", lambda r: r["replicas_1"].__setitem__("requests_per_s", 999.0))
    changed = tables.render(readme, results)
    assert "999 requests/s" in _section(changed, "perf-serve") and changed != readme


def test_check_exits_1_when_the_readme_disagrees(tmp_path, monkeypatch):
    tables = _tables()
    readme = tables.render(_readme())
    serve = _section(readme, "perf-serve")
    edited = serve.replace("requests/s |", "requests/s (edited) |", 1)
    (tmp_path / "README.md").write_text(readme.replace(serve, edited))
    monkeypatch.setattr(tables, "README", tmp_path / "README.md")
    monkeypatch.setattr(sys, "argv", ["readme_tables.py", "--check"])
    assert tables.main() == 1
    (tmp_path / "README.md").write_text(readme)
    assert tables.main() == 0


def test_comparisons_are_preferred_over_the_files_own_keys(tmp_path):
    tables = _tables()
    results = _results_copy(tmp_path)
    entry = {"what": "paper block / its two matmuls alone, forward + backward time (lower is better)",
             "median": 1.4321, "min": 1.2, "max": 1.9, "rounds": 15, "per_round": [1.4321] * 15,
             "target": 1.3, "target_met": False}
    projected = {**entry, "what": "share at 64 GPUs", "target": None, "target_met": None, "projection": True}
    _edit(results, "model.json", lambda r: r.update(comparisons={"paper_block_vs_matmuls": entry, "p": projected}))
    table = _section(tables.render(_readme(), results), "perf-model")
    assert ("| paper block / its two matmuls alone, forward + backward time (lower is better) | "
            "1.43× (1.20×–1.90×, 15 rounds) | ≤ 1.30×: **missed** | `model.json` |") in table
    assert "| projection: share at 64 GPUs |" in table
    assert "textbook roll" not in table, "with comparisons, the file's own keys give no rows"


def test_figures_no_ratio_replaces_stay_beside_the_comparisons(tmp_path):
    tables = _tables()
    results = _results_copy(tmp_path)
    entry = {"what": "2 ranks / 1 rank, step time (lower is better)", "median": 0.7, "min": 0.6, "max": 0.8,
             "rounds": 5, "per_round": [0.7] * 5, "target": None, "target_met": None}
    _edit(results, "scale.json", lambda r: r.update(comparisons={"step": entry}))
    _edit(results, "train.json", lambda r: r.update(comparisons={"step": entry}))
    table = _section(tables.render(_readme(), results), "perf-train")
    assert table.count("| 2 ranks / 1 rank, step time (lower is better) | 0.70× (0.60×–0.80×, 5 rounds) |") == 2
    for kept in ("`lipnext plan` / measured peak RSS, 2 ZeRO-3 ranks", "the same, resumed at 1 rank",
                 "step time, one process", "its certificate ready"):
        assert kept in table, kept
    assert "a checkpoint's step stall" not in table, "a ratio row gives way to the comparisons"


def test_conditions_say_quiet_only_when_the_file_says_so(tmp_path):
    tables = _tables()
    results = _results_copy(tmp_path)
    _edit(results, "serve.json", lambda r: r.update(conditions={"verdict": "QUIET"}))
    assert "| `serve.json` | QUIET |" in _section(tables.render(_readme(), results), "perf-serve")
    for conditions in ({"verdict": "NOISY"}, None):
        _edit(results, "serve.json", lambda r: r.update(conditions=conditions))
        table = _section(tables.render(_readme(), results), "perf-serve")
        assert "QUIET" not in table and "| `serve.json` | not quiet: to be re-measured |" in table


def test_targets_are_judged_from_the_json_and_misses_shown_plainly(tmp_path):
    tables = _tables()
    results = _results_copy(tmp_path)
    label = "| training step / AdamW's, width 1024 (paired per round) |"
    for median, verdict in ((1.25, "≤ 1.30×: met"), (1.35, "≤ 1.30×: **missed**")):
        _edit(results, "optim.json", lambda r: r["train_step_c1024"]["paired_ratios_vs_adamw"]["ours_fast_exp"]
              .update(median=median))
        row = [line for line in _section(tables.render(_readme(), results), "perf-optim").splitlines()
               if line.startswith(label)]
        assert len(row) == 1 and f"| {verdict} |" in row[0], row
    _edit(results, "data.json", lambda r: r["comparisons"]["loader-imagenet-vs-imagefolder"].update(
        median=1.25, min=1.1, max=1.3, rounds=3, per_round=[1.1, 1.3, 1.25], target_met=True))
    data = _section(tables.render(_readme(), results), "perf-data")
    assert "| 1.25× (1.10×–1.30×, 3 rounds) | ≥ 1.20×: met |" in data


def test_computed_figures_are_labelled_projection():
    optim = _section(_tables().render(_readme()), "perf-optim")
    flop_rows = [line for line in optim.splitlines() if "FLOP" in line or "lipnext-2b" in line]
    assert flop_rows and all(line.startswith("| projection: ") for line in flop_rows)


def test_an_unlabelled_variant_missing_markers_and_a_missing_file_are_one_line_errors(tmp_path):
    tables = _tables()
    results = _results_copy(tmp_path)
    _edit(results, "ablation.json", lambda r: r["variants"].__setitem__("brand_new", r["variants"]["paper"]))
    with pytest.raises(ValueError, match="brand_new.*ABLATION_ROWS"):
        tables.render(_readme(), results)
    with pytest.raises(ValueError, match="lacks the markers"):
        tables.render("no tables here")
    results = _results_copy(tmp_path / "again")
    (results / "serve.json").unlink()
    with pytest.raises(ValueError, match=r"\['serve.json'\] missing.*run their bench"):
        tables.render(_readme(), results)
    results = _results_copy(tmp_path / "third")
    _edit(results, "serve.json", lambda r: r.pop("replicas_2"))
    with pytest.raises(ValueError, match="lacks 'replicas_2.requests_per_s'.*bench/readme_tables.py"):
        tables.render(_readme(), results)
