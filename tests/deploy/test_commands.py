"""The check the deployment tests rely on: it accepts real command lines and rejects the rest."""

from __future__ import annotations

import pytest


def test_real_command_lines_pass(real_command):
    assert real_command("meddaemon start --config /etc/x.toml --observer polling").name == "start"
    assert real_command(["/opt/bin/meddaemon", "health", "--json", "--node=a", "--this-node"]).name == "health"
    assert real_command("medcli models import /models/busi-v3 --json").name == "import"
    assert real_command("medcli models promote busi v3").name == "promote"


@pytest.mark.parametrize(
    "argv",
    [
        "meddaemon launch",  # no such command
        "meddaemon start --frobnicate",  # no such option
        "meddaemon config",  # a group, not a command
        "meddaemon start --config",  # a value missing
        "medcli start",  # no such command of medcli
        "python -m meddaemon start",  # another program
        "medcli models import",  # its FOLDER missing
        "medcli models promote busi v3 extra",  # one argument too many
    ],
)
def test_anything_else_fails(real_command, argv):
    with pytest.raises(AssertionError):
        real_command(argv)
