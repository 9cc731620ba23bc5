"""Checkpoints and exports: everything that writes or reads trained weights (below train/ and certify/).

  format.py   the training-checkpoint layout, per-rank sha256 manifests, validation, discovery and the one
              resolver of "a checkpoint or a run directory" (`resolve_checkpoint`, used by export and certify)
  state.py    reading a checkpoint at any world size: full tensors, one new rank's ZeRO-3 partitions,
              the manifold state per owner
  zero.py     DeepSpeed ZeRO-3 engine <-> checkpoint tensors (DeepSpeed imported inside functions)
  manager.py  CheckpointManager: the start point of a job, save (synchronous or in the background), load, prune
  retention.py which checkpoints prune keeps (newest, best certified, under certification) and the
              certification records `{run}/certify/step_X/status.json` it reads
  export.py   the exported-model format (`lipnext export` writes it, `lipnext certify` reads it)
The ZeRO-3 partition arithmetic is `lipnext_scale.optim.partition`, shared with the optimizer.
"""

from lipnext_scale.ckpt.export import (
    ExportError, check_state_dict, export_checkpoint, is_exported, load_exported, model_kwargs, save_exported,
)
from lipnext_scale.ckpt.format import (
    FORMAT_VERSION, CheckpointError, checkpoint_dir_name, find_latest_valid, list_checkpoints, read_meta,
    resolve_checkpoint, validate_checkpoint, write_rank_files,
)
from lipnext_scale.ckpt.manager import CheckpointManager, NonFiniteState, Restored, StartPoint
from lipnext_scale.ckpt.state import TrainState, consolidate_checkpoint, load_manifold_state, load_train_state

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "CheckpointManager", "ExportError", "NonFiniteState", "Restored",
    "StartPoint", "TrainState", "check_state_dict", "checkpoint_dir_name", "consolidate_checkpoint",
    "export_checkpoint", "find_latest_valid", "is_exported", "list_checkpoints", "load_exported",
    "load_manifold_state", "load_train_state", "model_kwargs", "read_meta", "resolve_checkpoint",
    "save_exported", "validate_checkpoint", "write_rank_files",
]
