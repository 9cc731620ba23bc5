"""One typed job config: dataclasses (sections.py), loaded from TOML files under `configs/` with
`--set a.b=value` (load.py); the batch arithmetic of a run in batch.py. `from lipnext_scale.config import X`
reaches every public name.
"""

from lipnext_scale.config.batch import BatchPlan
from lipnext_scale.config.errors import ConfigError
from lipnext_scale.config.load import (
    MIGRATIONS, Migration, _build, config_from_dict, config_to_dict, load_config, migrate_stored, parse_override,
    read_toml,
)
from lipnext_scale.config.sections import (
    Architecture, Attack, CertifyConfig, CheckpointConfig, CheckpointUpload, DataConfig, Dataset, EuclidOptimizer,
    FastExpRule, JobConfig, LossConfig, LossKind, ModelConfig, Moments, OptimConfig, Precision, Retraction,
    RotationDtype, ShiftMode, TrainConfig, check_choices, choices,
)

__all__ = [
    "Architecture", "Attack", "BatchPlan", "CertifyConfig", "CheckpointConfig", "CheckpointUpload", "ConfigError",
    "DataConfig", "Dataset", "EuclidOptimizer", "FastExpRule", "JobConfig", "LossConfig", "LossKind", "MIGRATIONS",
    "Migration", "ModelConfig", "Moments", "OptimConfig", "Precision", "Retraction", "RotationDtype", "ShiftMode",
    "TrainConfig", "check_choices", "choices", "config_from_dict", "config_to_dict", "load_config",
    "migrate_stored", "parse_override", "read_toml",
]
