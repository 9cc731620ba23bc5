"""Checkpoints and exports: everything that writes or reads trained weights (below train/ and certify/).

  layout.py   RunLayout: a run directory's paths (config.json, tensorboard/, step_X/, certify/step_X/), and
              the one step <-> directory-name mapping
  format.py   the training-checkpoint layout, per-rank sha256 manifests, validation, discovery and the one
              resolver of "a checkpoint or a run directory" (`resolve_checkpoint`, used by export and certify)
  state.py    reading a checkpoint at any world size: full tensors, one new rank's ZeRO-3 partitions,
              the manifold state per owner
  zero.py     DeepSpeed ZeRO-3 engine <-> checkpoint tensors (DeepSpeed imported inside functions)
  manager.py  CheckpointManager: the start point of a job, save (synchronous or in the background), load, prune
  staging.py  the local staging directories saves write (named by host and process), swept once their
              process has ended (a worker killed mid-save)
  retention.py which checkpoints prune keeps (newest, best certified, under certification) and the
              certification records `{run}/certify/step_X/status.json` it reads
  export.py   the exported-model format (`lipnext export` writes it, `lipnext certify` reads it)
  cli.py      `lipnext export`: its flags and command
The ZeRO-3 partition arithmetic is `lipnext_scale.optim.partition`, shared with the optimizer.
"""

from __future__ import annotations

import importlib

# Each public name and the module defining it, imported on first use: `lipnext --help` imports ckpt.cli (the
# flags of `lipnext export`) without torch, which export, format, manager and state need.
_DEFINED_IN = {
    **dict.fromkeys(("ExportError", "check_state_dict", "export_checkpoint", "is_exported", "load_exported",
                     "model_kwargs", "save_exported"), "export"),
    **dict.fromkeys(("FORMAT_VERSION", "CheckpointError", "checkpoint_dir_name", "find_latest_valid",
                     "list_checkpoints", "read_meta", "resolve_checkpoint", "validate_checkpoint",
                     "write_rank_files"), "format"),
    **dict.fromkeys(("CheckpointManager", "NonFiniteState", "Restored", "StartPoint"), "manager"),
    **dict.fromkeys(("TrainState", "consolidate_checkpoint", "load_manifold_state", "load_train_state"), "state"),
}
__all__ = sorted(_DEFINED_IN)


def __getattr__(name: str):
    if name not in _DEFINED_IN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_DEFINED_IN[name]}"), name)
    globals()[name] = value
    return value
