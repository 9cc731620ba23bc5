"""Every byte goes through lipnext_scale/storage.py (shared/STYLE.md rule 11): no module of the package calls
fsspec, `url_to_fs`, the builtin `open`, `os`'s or `shutil`'s file operations or pathlib's read/write/unlink/
mkdir itself. storage.py is where retries, atomic writes and one-line errors naming the URL live; a raw call
elsewhere skips all three.

Read from the source with `ast`, like tests/unit/test_import_graph.py, so the rule covers every module,
including code paths no other test runs. Libraries that write their own files (TensorBoard's event writer)
and readers given a storage-opened file object (`tarfile.open(fileobj=f)`, `Image.open(io.BytesIO(...))`)
are fine: those are not calls this checker looks for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lipnext_scale"
HOME = "storage.py"

OS_FILE_CALLS = {"remove", "rename", "renames", "replace", "listdir", "makedirs", "mkdir", "rmdir", "removedirs",
                 "unlink", "scandir", "walk"}
OS_PATH_QUERIES = {"exists", "isdir", "isfile", "getsize"}
PATHLIB_CALLS = {"read_text", "read_bytes", "write_text", "write_bytes", "unlink", "mkdir", "rmdir", "touch"}

# Modules allowed a raw file access: none. Do not add to it: give storage.py the helper the new code needs
# instead. (runtime.restrict_token_file's stat/chmod of Ray's local token file is not a call this checker looks
# for: it changes a local file's permissions, which fsspec and so storage.py have no call for.)
NOT_YET_CONVERTED: set[str] = set()
NOT_YET_CONVERTED_DIRS: tuple[str, ...] = ()


def _dotted(node: ast.AST) -> str:
    """"os.path.exists" of the expression `os.path.exists`; "" for anything that is not a dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _raw_io(node: ast.AST) -> str | None:
    """What is wrong with one node (a raw file access), or None."""
    if isinstance(node, ast.Import):
        bad = [a.name for a in node.names if a.name.split(".")[0] in ("fsspec", "shutil")]
        return f"import {', '.join(bad)}" if bad else None
    if isinstance(node, ast.ImportFrom):
        root = (node.module or "").split(".")[0]
        if node.level == 0 and root in ("fsspec", "shutil"):
            return f"from {node.module} import ..."
        if any(a.name == "url_to_fs" for a in node.names):
            return "imports url_to_fs"
        return None
    if not isinstance(node, ast.Call):
        return None
    name = _dotted(node.func)
    last = name.rsplit(".", 1)[-1] if name else getattr(node.func, "attr", "")
    if name == "open":
        return "builtin open()"
    if last == "url_to_fs" or name.split(".")[0] in ("fsspec", "shutil"):
        return f"{name or last}()"
    if name.startswith("os.path.") and last in OS_PATH_QUERIES:
        return f"{name}()"
    if name.startswith("os.") and name.count(".") == 1 and last in OS_FILE_CALLS:
        return f"{name}()"
    if isinstance(node.func, ast.Attribute) and last in PATHLIB_CALLS and _dotted(node.func.value) != "storage":
        return f".{last}()"
    return None


def raw_io_calls(path: Path, package: Path = PACKAGE) -> list[str]:
    """"file:line: what" for every raw file access in one module of `package` (the checker)."""
    rel = path.relative_to(package).as_posix()
    if rel == HOME:
        return []
    tree = ast.parse(path.read_text(), str(path))
    found = [(node.lineno, what) for node in ast.walk(tree) if (what := _raw_io(node)) is not None]
    return [f"{rel}:{line}: {what}" for line, what in sorted(found)]


def _not_yet_converted(rel: str) -> bool:
    return rel in NOT_YET_CONVERTED or rel.startswith(NOT_YET_CONVERTED_DIRS)


def _modules(package: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in package.rglob("*.py")
                  if not _not_yet_converted(p.relative_to(package).as_posix()))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_every_file_access_goes_through_storage(path):
    found = raw_io_calls(path)
    assert not found, (f"raw file access outside storage.py: {found}; use the storage.py helper (open_url, "
                       "read_bytes, read_json, write_json, atomic_write_bytes, list_dir, glob, makedirs, move, "
                       "remove, ...) or add the one that is missing there")


def test_the_checker_finds_each_raw_call_and_passes_the_allowed_ones(tmp_path):
    """The checker itself, on a synthetic package: each kind of raw access is reported with its line, and
    what is allowed (storage.py itself, our helpers, readers of file objects, os.path string work) is not."""
    package = tmp_path / "lipnext_scale"
    modules = {
        "storage.py": "import fsspec\nimport os\ndef f(u):\n    os.replace(u, u)\n    return fsspec.core.url_to_fs(u)\n",
        "ckpt/bad.py": (
            "import os, shutil\n"                                   # 1
            "from lipnext_scale.storage import url_to_fs\n"         # 2
            "def f(url, p):\n"                                      # 3
            "    fs, path = url_to_fs(url)\n"                       # 4
            "    with open(path) as fh:\n"                          # 5
            "        fh.read()\n"                                   # 6
            "    os.listdir(path)\n"                                # 7
            "    shutil.rmtree(path, ignore_errors=True)\n"         # 8
            "    p.write_text('x')\n"                               # 9
            "    os.path.isdir(path)\n"                             # 10
            "    import fsspec\n"                                   # 11
            "    return fsspec.open(url)\n"                         # 12
        ),
        "data/good.py": (
            "import io, os, tarfile, tempfile\n"
            "from lipnext_scale import storage\n"
            "from lipnext_scale.storage import list_dir, open_url, read_bytes\n"
            "def f(url):\n"
            "    with open_url(url) as fh, tarfile.open(fileobj=fh) as tar:\n"
            "        tar.extractfile('x').read()\n"
            "    local = tempfile.mkdtemp()\n"
            "    os.path.join(local, os.path.basename(url))\n"
            "    storage.read_bytes(url)\n"
            "    return read_bytes(url), [e.name for e in list_dir(url)], os.environ.get('X')\n"
        ),
    }
    for rel, text in modules.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    found = {p.relative_to(package).as_posix(): raw_io_calls(p, package) for p in sorted(package.rglob("*.py"))}
    assert found == {
        "storage.py": [],
        "ckpt/bad.py": ["ckpt/bad.py:1: import shutil", "ckpt/bad.py:2: imports url_to_fs",
                        "ckpt/bad.py:4: url_to_fs()", "ckpt/bad.py:5: builtin open()", "ckpt/bad.py:7: os.listdir()",
                        "ckpt/bad.py:8: shutil.rmtree()", "ckpt/bad.py:9: .write_text()",
                        "ckpt/bad.py:10: os.path.isdir()", "ckpt/bad.py:11: import fsspec",
                        "ckpt/bad.py:12: fsspec.open()"],
        "data/good.py": [],
    }
