"""Commands printed for the user to run next, built from the options they gave, so that the line
printed can be copy-pasted: the same ``--config``, ``--state-dir`` and ``--db`` find the same database."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence

import click
from click.core import ParameterSource

PROGRAM = "medcli"
#: the options that say which configuration and database a command works on (``settings_options``)
SETTINGS_PARAMS = ("config_file", "state_dir", "db")


def given_options(ctx: click.Context, names: Iterable[str] | None = None, *, drop: Sequence[str] = ()) -> list[str]:
    """The options of ``ctx``'s command that were given on its command line, as arguments to repeat.

    ``names`` limits them to those parameters (all when None); ``drop`` leaves parameters out.
    """
    wanted = None if names is None else set(names)
    argv: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or name is None or name in drop:
            continue
        if wanted is not None and name not in wanted:
            continue
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params.get(name)
        if param.is_flag:
            if value:
                argv.append(param.opts[0])
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
        elif value is not None:
            argv += [param.opts[0], str(value)]
    return argv


def command_line(*words: str) -> str:
    """``medcli WORDS...``, quoted for a POSIX shell."""
    return shlex.join([PROGRAM, *words])
