"""Command-line arguments that launchers add, which the stages' parsers must not see."""

from __future__ import annotations

import os


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The ``deepspeed`` launcher puts ``--local_rank=N`` before the subcommand: record it in the
    environment (``LOCAL_RANK``, where :func:`g3n_train.setup_distributed` reads it; a value the
    launcher already exported wins) and drop it from the arguments."""
    out, it = [], iter(argv)
    for a in it:
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank"):
            os.environ.setdefault("LOCAL_RANK", next(it, "0"))
        else:
            out.append(a)
    return out
