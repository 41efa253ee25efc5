"""Fixtures for the deployment files: does a command line in them name a real ``meddaemon`` command?"""

from __future__ import annotations

import re
import shlex

import click
import pytest
from click.testing import CliRunner

from meddaemon.cli.daemon import cli


def assert_real_meddaemon_command(argv: list[str] | str) -> click.Command:
    """Walk ``meddaemon SUBCOMMAND... --flag value ...`` through the Click CLI; fail on anything unknown.

    The subcommand's ``--help`` is run through CliRunner too, and must list every flag used.
    """
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    assert args and args[0].rsplit("/", 1)[-1] == "meddaemon", f"not a meddaemon command: {args}"
    command: click.Command = cli
    path: list[str] = []
    rest = args[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in command.commands, f"meddaemon has no command {' '.join([*path, name])!r}"
        command = command.commands[name]
        path.append(name)
    assert not isinstance(command, click.Group), f"{' '.join(path)!r} is a group, not a command"

    options = {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    used: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        if not token.startswith("-"):
            raise AssertionError(f"unexpected argument {token!r} for meddaemon {' '.join(path)}")
        name, has_value = (token.split("=", 1)[0], True) if "=" in token else (token, False)
        assert name in options, f"meddaemon {' '.join(path)} has no option {name}"
        used.append(name)
        param = options[name]
        takes_value = isinstance(param, click.Option) and not param.is_flag and not param.count
        if takes_value and not has_value:
            assert i < len(rest), f"{name} needs a value"
            i += 1

    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    for name in used:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output), f"{name} not in --help"
    return command


@pytest.fixture
def real_command():  # type: ignore[no-untyped-def]
    """``real_command(argv)``: the Click command ``argv`` runs; fails on an unknown command or flag."""
    return assert_real_meddaemon_command
