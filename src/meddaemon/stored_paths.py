"""How file paths are written in the database, and read back: the one place for both.

A file under the state directory (work/, archive/, failed/, heatmaps/, reports/) is stored relative
to it, in POSIX form (``archive/2026-01-02/scan.png``), so the database stays right when the state
directory is mounted elsewhere or ``medcli`` runs from another folder. Anything else (an inbox file
while its move is pending) is stored absolute. Databases written before stored absolute paths
everywhere; an absolute path reads back as it is.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


def stored_name(path: Path, state_dir: Path) -> str:
    """``path`` as the database keeps it: relative to ``state_dir`` when under it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(os.path.abspath(state_dir)).as_posix()
    except ValueError:
        return str(absolute)


def stored_file(stored: str, state_dir: Path) -> Path:
    """The file a stored path names: absolute paths as they are, the others under ``state_dir``."""
    path = Path(stored)
    if path.is_absolute():
        return path
    return Path(os.path.abspath(state_dir)) / PurePosixPath(stored)


def stored_spellings(path: Path, state_dir: Path) -> tuple[str, str]:
    """Both ways a file under ``state_dir`` may be written in a database older rows share with new
    ones (absolute, as before issue 12, and relative): for lookups that must find either."""
    return stored_name(path, state_dir), str(Path(os.path.abspath(path)))
