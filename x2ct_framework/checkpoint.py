"""Checkpoints: model weights as safetensors plus a JSON trainer state, written atomically.

A checkpoint is a folder (``runs/<name>/<stage>/last``) holding ``model.safetensors`` and
``state.json``. It is written into a temporary sibling folder and renamed into place, so a crash
never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

WEIGHTS = "model.safetensors"
STATE = "state.json"


def save_checkpoint(folder: str | Path, model: torch.nn.Module, state: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS))
    (tmp / STATE).write_text(json.dumps(state, indent=2, default=str))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or not a safetensors file: {exc}") from exc


def load_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE
    if not path.is_file():
        raise CheckpointError(f"checkpoint state not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint state {path} is damaged: {exc}") from exc


def load_into(model: torch.nn.Module, folder: str | Path, strict: bool = True) -> None:
    """Load checkpoint weights into ``model``; a mismatch names the keys and shapes involved."""
    weights = load_weights(folder)
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in weights and weights[k].shape != own[k].shape]
    if strict and (missing or unexpected or wrong):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"shape mismatch {len(wrong)} (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(f"checkpoint {folder} does not fit the model: " + ", ".join(parts))
    model.load_state_dict({k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}, strict=False)
