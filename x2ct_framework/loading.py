"""Load a trained stage's model, with the earlier stages it cascades from, ready for inference."""

from __future__ import annotations

import torch

from x2ct_framework.checkpoint import load_into
from x2ct_framework.config.build import build_model
from x2ct_framework.errors import DataError
from x2ct_framework.runs import Target
from x2ct_framework.training.cascade import CascadeModel, previous_stages


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device}: no CUDA device is visible on this machine (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise DataError(f"--device {device!r}: not a device name (expected auto, cpu, cuda or cuda:N)") from exc


def load_model(target: Target, device: torch.device) -> torch.nn.Module:
    """The stage's model with the checkpoint's weights, in eval mode on ``device``."""
    from x2ct_framework.export import is_export, load_pretrained

    if is_export(target.checkpoint):  # the folder holds the whole chain and its description
        return load_pretrained(target.checkpoint, device)
    model = build_model(target.recipe, target.stage)
    load_into(model, target.checkpoint, strict=True)
    previous = previous_stages(target.recipe, target.stage, target.run_dir)
    if previous is not None:  # the checkpoint was trained with the earlier stages' prediction as prev
        model = CascadeModel(previous, model)
    return model.to(device).eval()
