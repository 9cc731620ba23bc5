"""The package's import graph points down only (shared/STYLE.md):

    config, eps, storage  <-  model  <-  optim  <-  ckpt  <-  data, train, certify  <-  cli, demo, info, serve

Read from the source (every `import`, including those inside functions), so a lazy import cannot hide an
upward arrow. Among the top library layer: train may use data and certify's math; certify may use data;
data uses neither; certify never imports train. serve sits with the entry points: no library module
imports it (cli wires it in by name).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lipnext_scale"

LEVEL = {"config": 0, "eps": 0, "storage": 0, "model": 1, "optim": 2, "ckpt": 3,
         "data": 4, "train": 4, "certify": 4, "cli": 5, "demo": 5, "info": 5, "plan": 5,
         "serve": 5}
SIDEWAYS = {("config", "eps"), ("train", "data"), ("train", "certify"), ("certify", "data")}
FORBIDDEN_THIRD_PARTY = {"model": {"deepspeed", "ray", "fsspec", "pyarrow", "webdataset", "tensorboard"},
                         "config": {"torch", "deepspeed", "ray", "fsspec"},
                         "eps": {"torch", "deepspeed", "ray", "fsspec"}}


def _component(module_path: Path) -> str:
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if _component(p) != "__init__")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    src = _component(path)
    assert src in LEVEL, f"{path}: new top-level component {src!r}: give it a level in this test"
    upward = []
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "lipnext_scale" and len(parts) > 1 and parts[1] in LEVEL:
            dst = parts[1]
            if dst == src:
                continue
            if LEVEL[dst] > LEVEL[src] or (LEVEL[dst] == LEVEL[src] and (src, dst) not in SIDEWAYS):
                upward.append(name)
        if parts[0] in FORBIDDEN_THIRD_PARTY.get(src, ()):
            upward.append(name)
    assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(set(upward))}: an upward arrow"


def test_the_rules_catch_the_arrows_they_name(tmp_path):
    """The checker itself: the two arrows the issue names are refused."""
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from lipnext_scale.train.checkpoint import x\n    import deepspeed\n")
    names = _imports(bad)
    assert "lipnext_scale.train.checkpoint" in names and "deepspeed" in names
    assert ("certify", "train") not in SIDEWAYS and "deepspeed" in FORBIDDEN_THIRD_PARTY["model"]
