"""``python -m x2ct_framework.run RECIPE [--set key=value ...] [--resume]``.

The same module runs under ``accelerate launch -m x2ct_framework.run RECIPE``; the ``x2ct run``
console command calls it too.
"""

from __future__ import annotations

import argparse
import os
import sys

from x2ct_framework.errors import X2CTError


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="TOML recipe file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (dotted, 1-based array positions), value in TOML")
    parser.add_argument("--resume", action="store_true",
                        help="skip finished stages and continue the interrupted one from its last checkpoint "
                             "(same data order, same final weights)")
    parser.add_argument("--allow-change", dest="allow_changes", action="append", default=[], metavar="KEY",
                        help="with --resume: accept this change of a training key (dotted, e.g. stages.1.lr; a table "
                             "allows every key under it) against the run folder's recipe.toml")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in a run folder that holds checkpoints: the old folder is moved aside to "
                             "<name>.replaced-<time> (nothing is deleted)")
    from x2ct_framework.plugins import add_trust_arguments

    add_trust_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.training.trainer import Trainer

    from x2ct_framework.plugins import apply_trust_arguments

    apply_trust_arguments(args)
    recipe = load_recipe(args.recipe, args.overrides)  # every check, before anything trains
    Trainer(recipe, resume=getattr(args, "resume", False), overwrite=getattr(args, "overwrite", False),
            allow_changes=getattr(args, "allow_changes", [])).run()
    return 0


def debugging() -> bool:
    """``X2CT_DEBUG=1``: errors show their traceback instead of the one-paragraph message."""
    return os.environ.get("X2CT_DEBUG", "") not in ("", "0", "false", "no")


def report_errors(fn, *args) -> int:
    """Run ``fn``; a user-input error becomes a one-paragraph message and its exit status.

    An ``OSError`` that escapes (a full disk or a permission problem while writing an output) is reported
    the same way, with exit status 2. ``X2CT_DEBUG=1`` re-raises, so the traceback is shown.
    """
    from x2ct_framework.training.interrupt import install_terminate_handler, reset_received

    reset_received()
    previous = install_terminate_handler()
    try:
        return fn(*args)
    except X2CTError as exc:
        if debugging():
            raise
        from x2ct_framework.safepaths import clip

        print(f"error: {clip(exc, 20000)}", file=sys.stderr)  # a message never echoes megabytes back
        return exc.exit_code
    except OSError as exc:
        if debugging():
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) and str(exc.filename) not in str(exc) else ""
        print(f"error: {exc}{where} (X2CT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from x2ct_framework.training.interrupt import exit_status

        code = exit_status()
        print("terminated (SIGTERM)" if code == 143 else "interrupted", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m x2ct_framework.run", description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    return report_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
