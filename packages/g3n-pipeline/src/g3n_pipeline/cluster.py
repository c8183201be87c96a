"""Checks for the cluster configuration (``configs/cluster``, ``tools/cluster/paper_chain.sh``).

A cluster script rots silently: a stage renames a flag, and the job fails hours into an
allocation. These helpers let a test (or a site, before submitting) check that every ``g3n-*``
subcommand and flag a script uses exists in that stage's own argparse parser, and that a
DeepSpeed hostfile parses.
"""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

_HOST_LINE = re.compile(r"^(?P<host>[A-Za-z0-9][A-Za-z0-9._-]*)\s+slots=(?P<slots>\d+)\s*$")
#: ``g3n-mae train``, ``"$(which g3n-mae)" train``: the command, then its subcommand
_INVOCATION = re.compile(r"(?<![\w/-])(?P<cmd>g3n-[a-z]+)\)?\"?\s+(?P<sub>[a-z][a-z-]*)")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_STOP = re.compile(r"\|\||&&|;|\|(?!\|)")
#: ``NAME=(--flag value ...)``: bash arrays of flags, expanded where ``"${NAME[@]}"`` is used
_ARRAY = re.compile(r"(?<![\w])(?P<name>[A-Za-z_][A-Za-z0-9_]*)=\((?P<body>[^)]*)\)")
_ARRAY_USE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\[@\]\}")


class HostfileError(ValueError):
    """A hostfile line is not ``HOST slots=N``; the message names the file and line."""


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """``{host: slots}`` of a DeepSpeed hostfile (``host slots=N`` lines; ``#`` comments, blanks)."""
    p = Path(path)
    hosts: dict[str, int] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if not m:
            raise HostfileError(f"{p}:{n}: expected 'HOST slots=N', got {raw!r}")
        host, slots = m["host"], int(m["slots"])
        if host in hosts:
            raise HostfileError(f"{p}:{n}: host {host!r} listed twice")
        if slots < 1:
            raise HostfileError(f"{p}:{n}: slots must be >= 1")
        hosts[host] = slots
    if not hosts:
        raise HostfileError(f"{p}: no hosts")
    return hosts


@dataclass(frozen=True)
class Invocation:
    """One ``g3n-*`` call in a script: command, subcommand, the flags given, and its line."""

    command: str
    subcommand: str
    flags: tuple[str, ...]
    line: int


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Script lines with backslash continuations joined and comment lines dropped."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        if not buf:
            start = n
            if raw.lstrip().startswith("#"):
                continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        out.append((start, buf + raw))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def script_invocations(path: str | Path) -> list[Invocation]:
    """Every ``g3n-*`` subcommand call of a shell script with the long flags that follow it."""
    lines = logical_lines(Path(path).read_text())
    arrays: dict[str, list[str]] = {}
    for _, line in lines:  # a flag array may be assigned in several places: check every flag it can hold
        for m in _ARRAY.finditer(line):
            arrays.setdefault(m["name"], []).extend(_FLAG.findall(m["body"]))
    calls = []
    for n, line in lines:
        for m in _INVOCATION.finditer(line):
            rest = line[m.end():]
            stop = _STOP.search(rest)
            rest = rest[: stop.start()] if stop else rest
            flags = _FLAG.findall(rest)
            for use in _ARRAY_USE.finditer(rest):
                flags += arrays.get(use["name"], [])
            calls.append(Invocation(m["cmd"], m["sub"], tuple(flags), n))
    return calls


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argparse parser behind a ``g3n-*`` console script (its module's ``build_parser()``)."""
    eps = {ep.name: ep for ep in entry_points(group="console_scripts")}
    if command not in eps:
        raise LookupError(f"{command}: no such console script is installed")
    module = importlib.import_module(eps[command].value.split(":")[0])
    if not hasattr(module, "build_parser"):
        raise LookupError(f"{command}: {module.__name__} has no build_parser()")
    return module.build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def check_invocations(calls: list[Invocation]) -> list[str]:
    """Problems (unknown command, subcommand or flag), each naming the script line; [] when fine."""
    problems: list[str] = []
    parsers: dict[str, argparse.ArgumentParser] = {}
    for c in calls:
        try:
            parser = parsers.setdefault(c.command, command_parser(c.command))
        except LookupError as e:
            problems.append(f"line {c.line}: {e}")
            continue
        subs = _subparsers(parser)
        if c.subcommand not in subs:
            problems.append(f"line {c.line}: {c.command} has no subcommand {c.subcommand!r} (has {sorted(subs)})")
            continue
        known = _options(subs[c.subcommand])
        for f in c.flags:
            if f not in known:
                problems.append(f"line {c.line}: {c.command} {c.subcommand} has no flag {f}")
    return problems
