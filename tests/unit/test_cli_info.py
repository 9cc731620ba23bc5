"""`lipnext info` lists every registered model with its counts."""

import json
import subprocess
import sys

from lipnext_scale.cli import main
from lipnext_scale.model import list_models


def test_info_table_lists_all_models(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert "GFLOPs/img" in out


def test_info_json_one_model(capsys):
    assert main(["info", "lipnext-2b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "lipnext-2b" and 1.8e9 < rows[0]["params"] < 2.2e9
    assert rows[0]["source"] == "inferred" and rows[0]["depth"] == 64 and rows[0]["width"] == 4096
    for key in ("params", "width", "depth", "patch_size", "image_size", "num_classes",
                "flops_per_image", "description"):  # the fields scripts already read stay
        assert key in rows[0]


def test_info_unknown_model_exits_2(capsys):
    assert main(["info", "lipnext-huge"]) == 2
    assert "registered models" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lipnext_scale.cli", "info", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert len(json.loads(out)) == len(list_models())
