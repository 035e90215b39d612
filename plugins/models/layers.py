"""Deprecated: the model plugins' layers, split by role in 0.2.0 (removed in 0.3.0).

Import from the module of each role instead: ``x2ct_plugins.models.inputs`` (input checks, resizing,
checkpointing), ``.encoder`` (timm view encoders, norms, view fusion), ``.lifting`` (back-projection,
sampling at projected points, positions), ``.attention`` and ``.decoder`` (3D blocks); the
point-to-detector projection is ``x2ct_framework.physics.project_points``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOMES = {
    "ModelInputError": "inputs",
    "check_inputs": "inputs",
    "resize3d": "inputs",
    "maybe_checkpoint": "inputs",
    "_groups": "inputs",
    "_cached_weights": "encoder",
    "_missing_weights_message": "encoder",
    "create_encoder": "encoder",
    "NORMS": "encoder",
    "PATCH_ENCODERS": "encoder",
    "_gn_groups": "encoder",
    "GroupNormAct": "encoder",
    "replace_batch_norm": "encoder",
    "FullResolution": "encoder",
    "ViewEncoder": "encoder",
    "AngleEmbedding": "encoder",
    "ViewFusion": "encoder",
    "lift": "lifting",
    "voxel_centres": "lifting",
    "project_points": "lifting",
    "sample_views": "lifting",
    "sample_volume": "lifting",
    "detector_plucker": "lifting",
    "fourier_features": "lifting",
    "FourierPoints": "lifting",
    "FourierPositions": "lifting",
    "Attention": "attention",
    "Block": "attention",
    "Join": "decoder",
    "Refine": "decoder",
    "residual_block": "decoder",
    "level_sizes": "decoder",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    new = f"x2ct_plugins.models.{home}"
    warnings.warn(f"x2ct_plugins.models.layers is split by role: import {name} from {new} instead (the old path is "
                  f"removed in 0.3.0)", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(new), name)


def __dir__() -> list[str]:
    return sorted(_HOMES)
