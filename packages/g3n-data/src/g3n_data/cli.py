"""`g3n-data`: a thin command line over the g3n_data Python API.

Each subcommand lives in the module that implements it; that module exposes
``add_command(subparsers)`` which registers its parser and sets ``func``.
Modules are imported lazily so that ``g3n-data --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that implements it (and exposes add_command)
COMMANDS: dict[str, str] = {
    "ingest": "g3n_data.ingest",
    "preprocess": "g3n_data.preprocess",
    "synth": "g3n_data.synth",
    "synth-anatomy": "g3n_data.synth.anatomy",
    "split": "g3n_data.splits",
    "check": "g3n_data.check",
    "export-nifti": "g3n_data.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="g3n-data",
        description="Turn raw MRI cohorts into BrainG3N `volumes` shard sets.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
