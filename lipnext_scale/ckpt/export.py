"""The exported-model format: what `lipnext export` writes and `lipnext certify` (or anyone) loads.

A directory (any fsspec URL) holding
  model.safetensors  fp32 weights (safetensors: no pickle, safe to load from anywhere)
  config.json        the resolved JobConfig dict (at least its `model` section)
  manifest.json      format version, sha256 + size of each file above, library versions
It is built under a temporary name and moved into place (`storage.atomic_write_files`), so a reader sees
all of it or none; overwriting replaces only an existing export, never another file or folder.
`load_exported` checks the manifest's hashes before it parses anything, and checks the weight names
and shapes against the model the config describes, so a corrupt or mismatched export fails clearly.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from lipnext_scale.errors import LipnextError
from lipnext_scale.storage import (
    Digest, atomic_write_files, digest, exists, is_dir, is_file, join_url, json_bytes, read_bytes, read_json,
    verify_digest, versions,
)

FORMAT = "lipnext-exported"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"


class ExportError(LipnextError, ValueError):
    """An exported model is missing, corrupt or does not match its config; the message names the file."""


def _file_entry(data: bytes) -> dict[str, Any]:
    d = digest(data)
    return {"sha256": d.sha256, "size": d.bytes}


def _model_section(config: dict) -> dict:
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not model.get("name"):
        raise ExportError("the config of an exported model needs a [model] section with at least `name` "
                          "(pass config_to_dict(job_config))")
    return model


def model_kwargs(config: dict) -> tuple[str, dict[str, Any]]:
    """(registry name, create_model kwargs) from a config dict's model section: num_classes, image_size
    and the architecture overrides that are set."""
    from lipnext_scale.config import ModelConfig, _build

    model = _model_section(config)
    try:
        section = _build(ModelConfig, model, "model")
        section.validate()
    except ValueError as e:
        raise ExportError(f"the model section of the config is invalid: {e}") from None
    return section.name, {"num_classes": section.num_classes, "image_size": section.image_size,
                          **section.overrides()}


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer names and shapes of the model `config` describes, sized on the meta device."""
    from lipnext_scale.model import create_model

    name, kwargs = model_kwargs(config)
    try:
        model = create_model(name, device="meta", **kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"cannot build model {name!r} from the config: {e}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(state_dict: dict[str, torch.Tensor], config: dict, where: str) -> None:
    """Raise ExportError naming missing, unexpected or mis-shaped weights."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("wrong shapes " + ", ".join(
                f"{k}: {tuple(state_dict[k].shape)} != {expected[k]}" for k in wrong[:5]))
        raise ExportError(f"{where}: weights do not match model {config['model']['name']!r} of its config "
                          f"({'; '.join(parts)}); export the checkpoint again with the config it was "
                          "trained with")


def _read_manifest(url: str) -> dict:
    manifest_url = join_url(url, MANIFEST_FILE)
    if not is_file(manifest_url, ExportError):
        raise ExportError(f"{url!r} has no manifest.json: it is not an exported model (write one with "
                          "`lipnext export`)")
    manifest = read_json(manifest_url, "export the model again", ExportError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("files"), dict):
        raise ExportError(f"{url!r}: manifest.json is not a {FORMAT} manifest; export the model again")
    return manifest


def save_exported(state_dict: dict[str, torch.Tensor], config: dict, out_url: str, *,
                  overwrite: bool = False) -> None:
    """Write an exported model directory at `out_url` in one step. With `overwrite`, an existing export
    there is replaced (the old one is removed only once the new one is in place); anything else at
    `out_url` (a file, a folder that is not an export) is refused, never deleted."""
    from safetensors.torch import save

    check_state_dict(state_dict, config, f"export to {out_url!r}")
    if exists(out_url, ExportError):
        if not overwrite:
            raise ExportError(f"{out_url!r} already exists; choose a new output URL or pass overwrite=True "
                              "(--overwrite) to replace the export there")
        if not is_dir(out_url, ExportError):
            raise ExportError(f"{out_url!r} is a file, not an exported model: --overwrite replaces only an "
                              "existing export; choose another output URL")
        try:
            _read_manifest(out_url)
        except ExportError as e:
            raise ExportError(f"{out_url!r} is a folder that is not an exported model ({e}); --overwrite "
                              "replaces only an existing export: choose another output URL") from None
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    files = {
        WEIGHTS_FILE: save(tensors, metadata={"format": FORMAT}),
        CONFIG_FILE: json_bytes(config, sort_keys=True),
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
                "files": {name: _file_entry(data) for name, data in files.items()}}
    files[MANIFEST_FILE] = json_bytes(manifest, sort_keys=True)
    atomic_write_files(out_url, files, replace=overwrite, error=ExportError)


def is_exported(url: str) -> bool:
    return is_file(join_url(url, MANIFEST_FILE), ExportError)


def _read_verified(url: str, name: str, manifest: dict) -> bytes:
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict):
        raise ExportError(f"{url!r}: manifest.json lists no {name}; the export is incomplete, export it again")
    data = read_bytes(join_url(url, name), ExportError, missing_ok=True)
    if data is None:
        raise ExportError(f"{url!r}: {name} is missing; the export is incomplete, export it again")
    verify_digest(digest(data), Digest(entry.get("size"), entry.get("sha256")), lambda what: ExportError(
        f"{url!r}: {name} does not match its sha256/size in manifest.json ({what}: corrupt or modified file); "
        "copy or export the model again"))
    return data


def load_exported(url: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state_dict, config dict) of an exported model, after verifying every file's hash."""
    from safetensors.torch import load

    if not exists(url, ExportError):
        raise ExportError(f"exported model {url!r} does not exist; check the URL")
    manifest = _read_manifest(url)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{url!r}: format_version {manifest.get('format_version')!r} is not supported "
                          f"(this code reads {FORMAT_VERSION}); upgrade lipnext_scale or export again")
    config_bytes = _read_verified(url, CONFIG_FILE, manifest)
    weights_bytes = _read_verified(url, WEIGHTS_FILE, manifest)
    try:
        config = json.loads(config_bytes)
        state_dict = load(weights_bytes)
    except Exception as e:  # hash matched, so this is a writer bug or a hand-made manifest
        raise ExportError(f"{url!r}: cannot parse config.json/model.safetensors ({e}); export again") from None
    check_state_dict(state_dict, config, repr(url))
    return state_dict, config


def export_checkpoint(ckpt_url: str, out_url: str, *, overwrite: bool = False) -> tuple[str, dict, dict]:
    """`lipnext export`: consolidate a training checkpoint (or a run directory's newest one, any world size)
    and write it in the exported format. Returns (checkpoint read, state_dict, config)."""
    from lipnext_scale.ckpt.format import resolve_checkpoint
    from lipnext_scale.ckpt.state import consolidate_checkpoint

    url = resolve_checkpoint(ckpt_url)
    state_dict, config = consolidate_checkpoint(url)
    save_exported(state_dict, config, out_url, overwrite=overwrite)
    return url, state_dict, config

