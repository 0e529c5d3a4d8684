"""Helpers for the deploy checks: the repository root, the real CLIs (lorafleet's typer app, Ray's click
app) to parse a manifest's commands against, and the `Settings` fields a `LORAFLEET_*` variable must name."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer.main

from fleet.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = "LORAFLEET_"


def _cli(program: str):
    """The program's command group: lorafleet's is typer's (typer vendors its own click), Ray's is click's."""
    if program == "lorafleet":
        from service.cli import app

        return typer.main.get_command(app)
    if program == "ray":
        from ray.scripts.scripts import cli

        return cli
    raise AssertionError(f"{program!r} is not a program our images install (lorafleet, ray)")


def check_command_line(line: str) -> list[str]:
    """Problems with one shell line of `&&`-joined commands run by our images: each must be `lorafleet`
    or `ray` with a real subcommand and options that subcommand accepts (click parses them, runs nothing)."""
    problems = []
    for part in line.split("&&"):
        argv = shlex.split(part)
        if argv and argv[0] == "exec":
            argv = argv[1:]
        if not argv:
            problems.append(f"empty command in {line!r}")
            continue
        try:
            group = _cli(argv[0])
        except AssertionError as e:
            problems.append(str(e))
            continue
        problems += _parse(group, argv)
    return problems


def _parse(group, argv: list[str]) -> list[str]:
    command, args = group, argv[1:]
    while _is_group(command) and args and not args[0].startswith("-"):
        sub = command.get_command(command.make_context(argv[0], [], resilient_parsing=True), args[0])
        if sub is None:
            return [f"`{' '.join(argv)}`: {args[0]!r} is not a command of {argv[0]}"]
        command, args = sub, args[1:]
    if _is_group(command):
        return [f"`{' '.join(argv)}` names no subcommand"]
    try:
        command.make_context(argv[0], list(args))
    except Exception as e:  # click's or typer's own click's UsageError: both say what was wrong
        if not hasattr(e, "format_message"):
            raise
        return [f"`{' '.join(argv)}`: {e.format_message()}"]
    return []


def _is_group(command) -> bool:
    return hasattr(command, "list_commands")


def settings_field(variable: str) -> str | None:
    """The `Settings` field `LORAFLEET_<FIELD>` sets, or None when there is no such field."""
    name = variable.removeprefix(ENV_PREFIX).lower()
    return name if name in Settings.model_fields else None


# ------------------------------------------------------------------------ compose-style interpolation
_INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])([^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")


def interpolations(text: str) -> list[tuple[str, str, str]]:
    """Every `${VAR}`, `${VAR:-default}`, `${VAR:?message}` in `text` as (VAR, operator, argument);
    `$${...}` is an escaped dollar that compose leaves to the container's shell."""
    return [(m[1], m[2] or "", m[3] or "") for m in _INTERPOLATION.finditer(text)]


def interpolate(text: str, env: dict[str, str]) -> str:
    """`text` with each interpolation replaced as compose does, from `env` (required ones must be there)."""

    def value(m: re.Match) -> str:
        name, op, arg = m[1], m[2] or "", m[3] or ""
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        raise KeyError(f"{name} is required: {arg}")

    return _INTERPOLATION.sub(value, text).replace("$$", "$")
