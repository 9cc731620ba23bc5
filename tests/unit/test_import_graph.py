"""The package's import graph points down only (shared/STYLE.md):

    errors  <-  config, eps, storage, runtime  <-  model  <-  optim  <-  ckpt
            <-  data, train, certify  <-  demo, info, plan, serve  <-  cli

Read from the source (every `import`, including those inside functions and relative ones), so a lazy or
relative import cannot hide an upward arrow. Among the top library layer: train may use data and certify's
math; certify may use data; data uses neither; certify never imports train. serve sits with the entry points:
no library module imports it (cli imports it explicitly).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lipnext_scale"

LEVEL = {"errors": -1, "config": 0, "eps": 0, "storage": 0, "runtime": 0, "model": 1, "optim": 2, "ckpt": 3,
         "data": 4, "train": 4, "certify": 4, "cli": 6, "demo": 5, "info": 5, "plan": 5,
         "serve": 5}
# config reads its TOML files through storage.py (the one I/O home, shared/STYLE.md rule 11), importing it inside
# read_toml so that loading the config package never loads fsspec.
SIDEWAYS = {("config", "eps"), ("config", "storage"), ("train", "data"), ("train", "certify"), ("certify", "data")}
FORBIDDEN_THIRD_PARTY = {"model": {"deepspeed", "ray", "fsspec", "pyarrow", "webdataset", "tensorboard"},
                         "config": {"torch", "deepspeed", "ray", "fsspec"},
                         "eps": {"torch", "deepspeed", "ray", "fsspec"},
                         "errors": {"torch", "deepspeed", "ray", "fsspec"}}


def _component(module_path: Path, package: Path = PACKAGE) -> str:
    rel = module_path.relative_to(package)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """Absolute names of everything `path` imports; relative imports resolved against its package."""
    here = ["lipnext_scale", *path.relative_to(package).with_suffix("").parts]
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(here[:-node.level] + [node.module or ""]).rstrip(".") if node.level else node.module
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def _modules(package: Path = PACKAGE):
    return sorted(p for p in package.rglob("*.py") if _component(p, package) != "__init__")


def _upward_imports(path: Path, package: Path = PACKAGE) -> list[str]:
    """The imports of one module of `package` that break the rules above (the checker)."""
    src = _component(path, package)
    assert src in LEVEL, f"{path}: new top-level component {src!r}: give it a level in this test"
    upward = []
    for name in _imports(path, package):
        parts = name.split(".")
        if parts[0] == "lipnext_scale" and len(parts) > 1 and parts[1] in LEVEL:
            dst = parts[1]
            if dst == src:
                continue
            if LEVEL[dst] > LEVEL[src] or (LEVEL[dst] == LEVEL[src] and (src, dst) not in SIDEWAYS):
                upward.append(name)
        if parts[0] in FORBIDDEN_THIRD_PARTY.get(src, ()):
            upward.append(name)
    return sorted(set(upward))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    upward = _upward_imports(path)
    assert not upward, f"{path.relative_to(PACKAGE)} imports {upward}: an upward arrow"


def test_the_rules_catch_the_arrows_they_name(tmp_path):
    """The checker itself, run on a synthetic package: each forbidden arrow is reported (lazy and
    relative imports included), and the allowed ones are not."""
    package = tmp_path / "lipnext_scale"
    modules = {
        # forbidden
        "certify/job.py": "def f():\n    from lipnext_scale.train.checkpoint import x\n",  # sideways, not allowed
        "model/layers.py": "def f():\n    import deepspeed\n",  # third party the model must not use
        "config/sections.py": "import lipnext_scale.model\n",  # upward
        "optim/update.py": "from lipnext_scale.ckpt.manager import CheckpointManager\n",  # upward
        "storage.py": "import lipnext_scale.cli\n",  # a top-level module, upward
        "data/shards.py": "from ..train import loop\n",  # relative, sideways the wrong way
        # allowed
        "train/loop.py": "from lipnext_scale.data import shards\nfrom lipnext_scale.certify import math\n",
        "ckpt/zero.py": "import deepspeed\nfrom lipnext_scale.optim import sharded\nfrom . import manager\n",
        "cli.py": "from lipnext_scale.train import trainer\n",
    }
    for rel, text in modules.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    found = {str(p.relative_to(package)): _upward_imports(p, package) for p in _modules(package)}
    assert found == {
        "certify/job.py": ["lipnext_scale.train.checkpoint", "lipnext_scale.train.checkpoint.x"],
        "model/layers.py": ["deepspeed"],
        "config/sections.py": ["lipnext_scale.model"],
        "optim/update.py": ["lipnext_scale.ckpt.manager", "lipnext_scale.ckpt.manager.CheckpointManager"],
        "storage.py": ["lipnext_scale.cli"],
        "data/shards.py": ["lipnext_scale.train", "lipnext_scale.train.loop"],
        "train/loop.py": [], "ckpt/zero.py": [], "cli.py": [],
    }
