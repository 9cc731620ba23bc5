"""Loading the job config: TOML file (with `extends`) -> nested dict -> `--set a.b=value` overrides ->
typed sections (config/sections.py) -> validation, early, with messages that name the key and the fix.

Unknown keys are rejected with the list of valid ones and values are checked against the field types.
Keys of older versions are in one table, `MIGRATIONS`: a file that uses one is told what replaced it; a
config stored by an older version (run config.json, checkpoints) is read with the key's new name.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lipnext_scale.config.errors import ConfigError
from lipnext_scale.config.sections import JobConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Migration:
    new: str | None  # the key's name now, in the same section; None: derived, no longer a key (dropped)
    why: str  # what the new key means (or, with new None, what to set instead)
    convert: Callable[[Any], Any] = lambda value: value  # an old stored value -> the new key's value

    def replacement(self, section: str) -> str:
        return f"{section}.{self.new} ({self.why})" if self.new else self.why


# Keys that used to exist, (section, old key) -> what replaced it.
MIGRATIONS = {
    ("data", "num_workers"): Migration("loader_processes", "DataLoader processes per training rank"),
    ("certify", "workers"): Migration("actors", "Ray actors that certify shards"),
    ("optim", "total_steps"): Migration(None, "nothing: the schedule length is train.steps (set that instead)"),
    ("optim", "polish"): Migration("polish_every", "1: a Newton-Schulz polish every update, as polish = true did; "
                                   "0: never", convert=lambda on: 1 if on else 0),  # a bool became a period
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and minimally convert) `value` against the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool):
            shown = ", ".join(repr(a) if a == "" else str(a) for a in allowed)
            raise ConfigError(f"{where}={value!r}: choose one of {shown}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}={value!r}: expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value!r}: must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a table")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """A section (or the whole job, `where` "") from its dict: keys and values checked, not yet validated."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    prefix = f"{where}." if where else ""
    for key in sorted(data):  # optim.total_steps is still a field (derived), yet no longer a key
        if (where, key) in MIGRATIONS:
            raise ConfigError(f"config key {prefix + key} was replaced by {MIGRATIONS[where, key].replacement(where)}")
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' in [' + where + ']' if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table, got {value!r}")
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as a TOML value, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=0.1")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be dotted names, e.g. model.width")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as lipnext-tiny or s3://bucket/x
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def read_toml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a TOML config; `extends = "other.toml"` (relative to this file) layers this one on top."""
    from lipnext_scale import storage  # here, not at the top: importing the config package loads no fsspec

    p = Path(path)
    if not storage.is_file(str(p), ConfigError):
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a path such as configs/train/demo.toml")
    if p.resolve() in _chain:
        loop = " -> ".join(str(c) for c in (*_chain, p.resolve()))
        raise ConfigError(f"config file {str(p)!r}: `extends` forms a loop ({loop}); remove one of them")
    raw = storage.read_bytes(str(p), ConfigError)  # a failed read: one line naming the file and the fix
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"config file {str(p)!r}: extends={parent!r} must be a file name")
        data = _merge(read_toml(p.parent / parent, (*_chain, p.resolve())), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = JobConfig) -> Any:
    data: dict[str, Any] = read_toml(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        data = _merge(data, _nest(keys, value))
    cfg = _build(cls, data, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as stored (run config.json, checkpoints): derived values left out."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, JobConfig):
        out["optim"].pop("total_steps", None)
    return out


def migrate_stored(data: dict[str, Any]) -> dict[str, Any]:
    """A stored job config of an older version with its keys' new names (`MIGRATIONS`); a copy."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (section, old), migration in MIGRATIONS.items():
        if isinstance(data.get(section), dict) and old in data[section]:
            value = migration.convert(data[section].pop(old))
            if migration.new is not None:
                data[section].setdefault(migration.new, value)
    return data


def config_from_dict(data: dict[str, Any], cls: type = JobConfig) -> Any:
    """Inverse of `config_to_dict` (e.g. a config stored in a checkpoint), validated like a loaded file;
    configs stored by older versions are read with their keys' new names."""
    data = migrate_stored(data) if cls is JobConfig else {k: dict(v) if isinstance(v, dict) else v
                                                          for k, v in data.items()}
    cfg = _build(cls, data, "")
    cfg.validate()
    return cfg
