"""Fixtures for the deployment files: does a command line in them name a real ``meddaemon`` or
``medcli`` command?"""

from __future__ import annotations

import re
import shlex

import click
import pytest
from click.testing import CliRunner

from meddaemon.cli.daemon import cli
from meddaemon.cli.medcli import cli as medcli

PROGRAMS: dict[str, click.Command] = {"meddaemon": cli, "medcli": medcli}


def assert_real_meddaemon_command(argv: list[str] | str) -> click.Command:
    """Walk ``meddaemon|medcli SUBCOMMAND... [ARGUMENT...] --flag value ...`` through the Click CLI;
    fail on anything unknown, or on more arguments than the command takes.

    The subcommand's ``--help`` is run through CliRunner too, and must list every flag used.
    """
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    program = args[0].rsplit("/", 1)[-1] if args else ""
    assert program in PROGRAMS, f"not a meddaemon or medcli command: {args}"
    root = PROGRAMS[program]
    command: click.Command = root
    path: list[str] = []
    rest = args[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in command.commands, f"{program} has no command {' '.join([*path, name])!r}"
        command = command.commands[name]
        path.append(name)
    assert not isinstance(command, click.Group), f"{' '.join(path)!r} is a group, not a command"

    options = {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    arguments = [param for param in command.params if isinstance(param, click.Argument)]
    used: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        if not token.startswith("-"):
            assert arguments, f"unexpected argument {token!r} for {program} {' '.join(path)}"
            arguments.pop(0)
            continue
        name, has_value = (token.split("=", 1)[0], True) if "=" in token else (token, False)
        assert name in options, f"{program} {' '.join(path)} has no option {name}"
        used.append(name)
        param = options[name]
        takes_value = isinstance(param, click.Option) and not param.is_flag and not param.count
        if takes_value and not has_value:
            assert i < len(rest), f"{name} needs a value"
            i += 1

    missing = [a.name for a in arguments if a.required]
    assert not missing, f"{program} {' '.join(path)} needs {', '.join(n.upper() for n in missing if n)}"
    result = CliRunner().invoke(root, [*path, "--help"])
    assert result.exit_code == 0, result.output
    for name in used:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output), f"{name} not in --help"
    return command


@pytest.fixture
def real_command():  # type: ignore[no-untyped-def]
    """``real_command(argv)``: the Click command ``argv`` runs; fails on an unknown command, flag or argument."""
    return assert_real_meddaemon_command
