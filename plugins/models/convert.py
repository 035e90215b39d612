"""The command line the published models' weight converters share: ``python -m x2ct_plugins.models.<name> SRC FOLDER``.

Each converter module keeps its own ``convert_checkpoint(source, folder, stage, **model_options)``; this module
parses the arguments, runs it and reports a bad file as the framework reports any error (a message, exit 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def converter_main(argv: list[str] | None, *, name: str, what: str, source_help: str, stage: str,
                   convert: Callable[..., object], add_options: Callable[[argparse.ArgumentParser], None] | None = None,
                   options: Callable[[argparse.Namespace], dict] | None = None) -> int:
    """Parse ``SRC FOLDER [--stage S]`` (plus ``add_options``'s arguments, passed to ``convert`` as ``options(args)``)
    and print the checkpoint folder ``convert`` writes."""
    from x2ct_framework.api import report_errors

    p = argparse.ArgumentParser(prog=f"python -m x2ct_plugins.models.{name}",
                                description=f"{what} -> a checkpoint folder")
    p.add_argument("source", help=source_help)
    p.add_argument("folder", help="checkpoint folder to write (holding model.safetensors and state.json)")
    p.add_argument("--stage", default=stage, help="the recipe's stage name")
    if add_options is not None:
        add_options(p)
    args = p.parse_args(argv)

    def run(a) -> int:
        print(convert(a.source, a.folder, a.stage, **(options(a) if options is not None else {})))
        return 0

    return report_errors(run, args)


def check_state_keys(state: dict, own: dict, path, what: str, hint: Callable[[list, list], str] | None = None) -> None:
    """Refuse a converted state dict whose keys or shapes differ from the model's: ``CheckpointError`` naming the
    file, ``what`` it should be, the missing, unexpected and reshaped keys (a few of each), and ``hint(missing,
    unexpected)`` (a sentence in parentheses, or "")."""
    from x2ct_framework.errors import CheckpointError

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here" for k in own
             if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or wrong):
        return

    def some(keys: list, n: int, sep: str) -> str:  # the first few (the count says how many there are)
        return sep.join(keys[:n]) + ("; ..." if sep == "; " and len(keys) > n else ", ..." if len(keys) > n else "")

    parts = [f"{len(missing)} missing ({some(missing, 4, ', ')})" if missing else "",
             f"{len(unexpected)} unexpected ({some(unexpected, 4, ', ')})" if unexpected else "",
             f"{len(wrong)} of another shape ({some(wrong, 3, '; ')})" if wrong else ""]
    raise CheckpointError(f"{path}: not {what} matching this model{hint(missing, unexpected) if hint else ''}: "
                          + ", ".join(p for p in parts if p))


def read_checkpoint(path, not_found: str, unreadable: str = ""):
    """``torch.load`` (tensors only) of a published checkpoint at ``path`` (a ``Path``): ``DataError(not_found)``
    when the file is absent, ``CheckpointError`` naming the file and the reader's error (then ``unreadable``,
    e.g. what the file should be) when it cannot be read."""
    import torch

    from x2ct_framework.errors import CheckpointError, DataError

    if not path.is_file():
        raise DataError(not_found)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: could not read the checkpoint ({type(exc).__name__}: {exc})"
                              f"{unreadable}") from exc


def unwrap_state(blob, path, expected: str, wrappers: tuple[str, ...] = ("state_dict", "model"),
                 allow_empty: bool = False) -> dict:
    """The state dict inside a published checkpoint ``blob`` read from ``path``: under any of ``wrappers`` (a
    training script's ``{'state_dict': ...}`` or ``{'model': ...}``), DataParallel's ``module.`` prefix removed;
    ``CheckpointError`` ("``path``: expected ``expected``, got ...") when it is not a dict of tensors."""
    import torch

    from x2ct_framework.errors import CheckpointError

    state = blob
    for key in wrappers:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if (not isinstance(state, dict) or not (state or allow_empty)
            or not all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path}: expected {expected}, got {type(blob).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
