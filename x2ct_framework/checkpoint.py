"""Checkpoints: safetensors weights plus a trainer state that loads without unpickling anything.

A checkpoint is a folder (``runs/<name>/<stage>/last``, ``best``, ``epoch0020``) holding

- ``model.safetensors``: the weights to evaluate or to start the next stage from (the EMA weights
  when the recipe keeps an EMA);
- ``state.json``: stage, epoch, step, metrics and whether the stage finished;
- ``trainer.safetensors`` + ``trainer.json`` (optional): everything needed to continue training
  exactly (optimizer, scheduler, scaler, RNG states, EMA, trainable loss parts). Tensors go to the
  safetensors file and the structure around them to JSON, so loading never runs pickle.

A checkpoint is written into a temporary sibling folder, flushed to disk and renamed into place,
so a crash never leaves a half-written checkpoint under the final name. While the old folder is
being replaced it briefly lives at ``<name>.old``; :func:`resolve` falls back to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from x2ct_framework.atomic import follow_umask
from x2ct_framework.errors import CheckpointError

WEIGHTS = "model.safetensors"
STATE = "state.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
# Flush each file to disk before the rename (survives power loss, not only a killed process).
FSYNC = os.environ.get("X2CT_CHECKPOINT_FSYNC", "1") not in ("0", "false", "no")


# ---- encoding nested state without pickle ---------------------------------------------------------
def encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Turn nested dicts/lists/tuples of tensors and plain values into JSON, moving tensors to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{len(tensors)}:{path}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{len(tensors)}:{path}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64) if obj.dtype.kind in "ui"
                                        else np.ascontiguousarray(obj))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode_state(k, tensors, path), encode_state(v, tensors, f"{path}.{k}")]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise CheckpointError(f"cannot store {type(obj).__name__} at {path or 'the top level'} of a trainer state "
                          f"(only tensors, arrays, numbers, strings and nested dicts/lists/tuples)")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    return obj


# ---- writing ---------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _weights(model_or_weights: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = model_or_weights.state_dict() if isinstance(model_or_weights, torch.nn.Module) else model_or_weights
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr in seen:  # tied weights: safetensors refuses shared storage
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def save_checkpoint(folder: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], state: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically: ``model`` is a module or a state dict."""
    from x2ct_framework.safepaths import guard

    folder = guard(Path(folder))
    tmp = guard(folder.with_name(folder.name + ".tmp"))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if tmp.is_symlink():
            tmp.unlink()
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        follow_umask(tmp, 0o777)
        save_file(_weights(model), str(tmp / WEIGHTS))
        files = [tmp / WEIGHTS]
        if trainer_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            structure = encode_state(trainer_state, tensors)
            save_file(tensors, str(tmp / TRAINER_TENSORS))
            (tmp / TRAINER_JSON).write_text(json.dumps(structure))
            files += [tmp / TRAINER_TENSORS, tmp / TRAINER_JSON]
        state = dict(state, sha256={f.name: _sha256(f) for f in files})
        (tmp / STATE).write_text(json.dumps(state, indent=2, default=str))
        files.append(tmp / STATE)
        for f in files:  # safetensors creates its files 0600: give every file the mode the umask says
            follow_umask(f)
        if FSYNC:
            for f in files:
                _fsync(f)
    except (OSError, SafetensorError) as exc:  # disk full, permissions: keep the previous checkpoint, say so
        _write_failed(folder, tmp, exc)
    return _install(tmp, folder)


def _write_failed(folder: Path, tmp: Path, exc: Exception) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    kept = f"; the previous checkpoint {resolve(folder)} is intact" if exists(folder) else ""
    raise CheckpointError(f"could not write checkpoint {folder}: {exc}{kept}") from exc


def _install(tmp: Path, folder: Path) -> Path:
    """Rename a finished ``tmp`` folder to ``folder``; the old one lives at ``.old`` for the instant between."""
    old = folder.with_name(folder.name + ".old")
    try:
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
    except OSError as exc:
        if old.exists() and not folder.exists():
            try:
                os.replace(old, folder)
            except OSError:
                pass  # resolve() still finds it at .old
        _write_failed(folder, tmp, exc)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return folder


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a finished checkpoint folder to ``dst`` atomically (used for best and periodic copies)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
    except OSError as exc:  # shutil.Error is an OSError too
        _write_failed(dst, tmp, exc)
    return _install(tmp, dst)


# ---- reading ---------------------------------------------------------------------------------------
def resolve(folder: str | Path) -> Path:
    """The checkpoint folder, or its ``.old`` copy when a crash hit between the two renames."""
    folder = Path(folder)
    if (folder / STATE).is_file():
        return folder
    old = folder.with_name(folder.name + ".old")
    if (old / STATE).is_file():
        return old
    return folder


def exists(folder: str | Path) -> bool:
    return (resolve(folder) / STATE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: str | Path, name: str) -> None:
    """Refuse a checkpoint file whose content differs from the digest recorded when it was written.

    The digests in ``state.json`` detect altered, truncated or swapped files; they are not a
    signature (whoever can rewrite the folder can rewrite them too).
    """
    folder = resolve(folder)
    try:
        expected = json.loads((folder / STATE).read_text()).get("sha256", {}).get(name)
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # load_state reports a missing or damaged state.json
    if expected is not None and _sha256(folder / name) != expected:
        raise CheckpointError(f"checkpoint file {folder / name} was altered or damaged after it was written "
                              f"(its sha256 differs from the one in {folder / STATE}); refusing to load it")


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    path = resolve(folder) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {path}")
    verify(folder, WEIGHTS)
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or not a safetensors file: {exc}") from exc


def load_state(folder: str | Path) -> dict[str, Any]:
    path = resolve(folder) / STATE
    if not path.is_file():
        raise CheckpointError(f"checkpoint state not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint state {path} is damaged: {exc}") from exc


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (safetensors + JSON; nothing is unpickled)."""
    folder = resolve(folder)
    tpath, jpath = folder / TRAINER_TENSORS, folder / TRAINER_JSON
    if not (tpath.is_file() and jpath.is_file()):
        raise CheckpointError(f"checkpoint {folder} has no trainer state ({TRAINER_TENSORS} and {TRAINER_JSON}); "
                              f"it holds weights only and cannot be resumed")
    verify(folder, TRAINER_TENSORS)
    verify(folder, TRAINER_JSON)
    try:
        tensors = load_file(str(tpath))
        return decode_state(json.loads(jpath.read_text()), tensors)
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"trainer state in {folder} is damaged: {exc}") from exc


def fit_report(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Which model keys a checkpoint lacks, which it adds, and which differ in shape."""
    return {
        "missing": [k for k in own if k not in weights],
        "unexpected": [k for k in weights if k not in own],
        "mismatched": [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in own if k in weights and weights[k].shape != own[k].shape],
    }


def load_into(model: torch.nn.Module, folder: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Load checkpoint weights into ``model``; a mismatch names the keys and shapes involved.

    With ``strict=False`` the weights that fit are loaded and the report of the rest is returned.
    """
    weights = load_weights(folder)
    own = model.state_dict()
    report = fit_report(own, weights)
    if strict and any(report.values()):
        parts = []
        for label, keys in (("missing", report["missing"]), ("unexpected", report["unexpected"]),
                            ("shape mismatch", report["mismatched"])):
            if keys:
                parts.append(f"{label} {len(keys)} (e.g. {'; '.join(keys[:3])})")
        raise CheckpointError(f"checkpoint {folder} does not fit the model: " + ", ".join(parts))
    model.load_state_dict({k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}, strict=False)
    return report
