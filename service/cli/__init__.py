"""`bitplan …`: the command line. Each area of service/cli/ registers its own subcommands; other
installed packages add theirs through the "bitplan.commands" entry point (bench: `bitplan bench`)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import sys

from sqlalchemy.exc import ArgumentError, OperationalError

from compressor.checkpoint.headers import ModelLoadError
from service.errors import UserError

# One module per area; each exposes `register(subparsers)` and sets `func` on its parsers.
COMMAND_MODULES = [
    "service.cli.model",
    "service.cli.server",
    "service.cli.planning",
    "service.cli.remote",
]
# Packages above the service (bench/) register commands through this entry-point group, so the
# service never imports them: `<name> = "<module with register(subparsers)>"` in pyproject.toml.
ENTRY_POINT_GROUP = "bitplan.commands"


def one_line(message: str, limit: int = 500) -> str:
    """Errors print as one line (pydantic and database messages span several)."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitplan", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for module in _plugin_modules():
        module.register(sub)
    return parser


def _plugin_modules() -> list:
    """The modules named in the entry-point group, by name. One whose module is absent (a build
    without it, stale metadata) is skipped: the rest of the CLI still works."""
    modules = []
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda ep: ep.name):
        try:
            modules.append(importlib.import_module(ep.module))
        except ModuleNotFoundError as exc:
            if exc.name is None or not (ep.module + ".").startswith(exc.name + "."):
                raise   # the module is there but one of its imports is not: a real error
            logging.getLogger(__name__).debug("command module %s is not installed", ep.module)
    return modules


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    def fail(message: str, status: int) -> int:
        print(f"bitplan {args.command}: error: {one_line(message)}", file=sys.stderr)
        return status

    try:
        return int(args.func(args) or 0)
    except (UserError, ModelLoadError, FileNotFoundError, ValueError, ArgumentError) as exc:
        if args.verbose:
            raise
        return fail(str(exc) or type(exc).__name__, 2)
    except OperationalError as exc:   # the environment, not the input: exit 1
        if args.verbose:
            raise
        return fail(f"database unavailable or not migrated (`bitplan db upgrade`): {exc.orig}", 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
