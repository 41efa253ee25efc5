"""Fixtures of the daemon tests: the subprocess daemons (``layout``, ``daemons``); a migrated
database with the task presets (``sessions``) is the root conftest's."""

from daemon_harness import daemons, layout  # noqa: F401 (fixtures)
