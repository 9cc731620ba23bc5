"""LipNeXt model family: `create_model(name, num_classes=..., image_size=...)`, `list_models()`."""

from lipnext_scale.model.layers import manifold_parameters, orthogonality_error
from lipnext_scale.model.lipnext import (
    LipNeXt, ModelInputError, ModelSpec, create_model, get_spec, list_models, model_info,
)

__all__ = [
    "LipNeXt", "ModelInputError", "ModelSpec", "create_model", "get_spec", "list_models", "model_info",
    "manifold_parameters", "orthogonality_error",
]
