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
