"""What in the inbox is a candidate scan, and the full scan that finds every one of them.

Watch events are hints; ``scan_inbox`` is the guarantee, run at start, periodically and after an
event overflow.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from meddaemon.names import fitted, is_utf8, shown_name, split_extension, utf8_name

#: what fsck keeps at the root of a file system: an inbox that is a mount point has it, root's alone
#: (every --once run of the daemon's user could not list it, and said the inbox was not drained)
LOST_AND_FOUND = "lost+found"


class Inbox:
    def __init__(self, root: Path, ignore: Iterable[str], exclude: Iterable[Path] = ()) -> None:
        self.root = root.resolve()
        self.ignore = tuple(ignore)
        self._exclude = tuple(p.resolve() for p in exclude)
        #: folders of the inbox the last full scan could not list (name inside the inbox -> why):
        #: their files wait there, unseen, until the daemon's user may read the folder
        self.unlisted: dict[PurePosixPath, str] = {}
        #: folders the last full scan listed that the scan before it could not
        self.relisted: set[PurePosixPath] = set()

    def relative_name(self, path: Path) -> PurePosixPath | None:
        """The path inside the inbox, or None if the path is not in it. A path spelled through a
        symlinked folder counts (its folder is resolved; the file itself, maybe a symlink, is not)."""
        absolute = Path(os.path.abspath(path))
        with contextlib.suppress(ValueError):
            return PurePosixPath(absolute.relative_to(self.root).as_posix())
        with contextlib.suppress(ValueError):
            resolved = Path(os.path.realpath(absolute.parent)) / absolute.name
            return PurePosixPath(resolved.relative_to(self.root).as_posix())
        return None

    def canonical(self, path: Path) -> Path | None:
        """The one spelling of an inbox file the daemon keys on (tracker, claims, rows): the
        resolved root joined with the name inside it; None outside the inbox."""
        rel = self.relative_name(path)
        return None if rel is None else self.root / rel

    def is_candidate(self, path: Path) -> bool:
        """A name the daemon may read: in the inbox, not in an excluded folder, not work in progress.

        Dotfiles (rsync's ``.name.XXXXXX``) and names matching ``ignore`` (``*.part``...) wait for
        the rename that gives them their final name.
        """
        rel = self.relative_name(path)
        if rel is None or not rel.parts:
            return False
        absolute = self.root / rel
        if any(absolute == ex or ex in absolute.parents for ex in self._exclude):
            return False
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] == LOST_AND_FOUND:
            return False
        return not any(fnmatch.fnmatchcase(rel.name, pattern) for pattern in self.ignore)

    def scan(self) -> Iterator[Path]:
        """Every candidate file below the root. Symlinks are yielded (and refused later), never followed.

        A folder that cannot be listed (its permissions, a failing share) is skipped and named in
        ``unlisted`` once the scan is through (``relisted`` names those listed again), for the daemon
        to log and ``meddaemon status`` to show. One that is gone by the time it is listed (moved
        away meanwhile) is no matter, but the root itself gone (removed, its share unmounted) is
        unlisted: it was an empty inbox, without a word."""
        unlisted: dict[PurePosixPath, str] = {}
        relisted: set[PurePosixPath] = set()
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                if folder == self.root:
                    unlisted[PurePosixPath(".")] = "the watch folder is gone: removed, or its share unmounted"
                continue
            except OSError as exc:
                unlisted[self._folder_name(folder)] = exc.strerror or str(exc)
                continue
            unsearchable = _unsearchable(entries)
            if unsearchable is not None:
                unlisted[self._folder_name(folder)] = f"{unsearchable} to look at its files"
                continue
            if self.unlisted and (name := self._folder_name(folder)) in self.unlisted:
                relisted.add(name)
            for entry in entries:
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    if self.is_candidate(path):
                        stack.append(path)
                elif self.is_candidate(path):
                    yield path
        self.unlisted, self.relisted = unlisted, relisted

    def _folder_name(self, folder: Path) -> PurePosixPath:
        return PurePosixPath(folder.relative_to(self.root).as_posix())


def _unsearchable(entries: list[os.DirEntry[str]]) -> str | None:
    """Why a folder's listed entries cannot be looked at (a folder listed but not searchable, mode
    0444), or None: one ``lstat`` tells for the folder. Its files' names were yielded, and the first
    look at them stopped the daemon."""
    if not entries:
        return None
    try:
        os.lstat(entries[0].path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder now (not one that is gone, or cannot be looked at)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def rename_to_utf8(root: Path, name: PurePosixPath) -> PurePosixPath:
    """Give the file ``name`` inside ``root``, and each folder on its way there, a valid UTF-8
    name (``utf8_name``, cut to fit ``NAME_MAX``; ``~1``, ``~2``... before the extension when that
    name is taken), renaming in place; returns its new name inside ``root``. ``FileNotFoundError``
    when it is gone (another daemon sharing the inbox renamed it first)."""
    renamed = PurePosixPath()
    for part in name.parts:
        fixed = part if is_utf8(part) else utf8_name(part)
        if fixed != part:
            stem, suffix = split_extension(fixed)
            target, n = root / renamed / fitted(stem, suffix), 0
            while os.path.lexists(target):
                n += 1
                target = root / renamed / fitted(stem, f"~{n}{suffix}")
            os.rename(root / renamed / part, target)
            fixed = target.name
        renamed /= fixed
    return renamed


def folder_words(name: PurePosixPath) -> str:
    """``inbox folder a/b``, or ``the inbox folder itself`` for its root."""
    return "the inbox folder itself" if name == PurePosixPath(".") else f"inbox folder {shown_name(name)}"


class WatchFolderMissing(FileNotFoundError):
    """The inbox does not exist: an unmounted share would otherwise look like an empty inbox."""


def ensure_watch_folder(folder: Path, create: bool) -> None:
    """Check that the inbox is a folder; make it only when ``create`` (``--create-watch``) asks."""
    if folder.is_dir():
        return
    if folder.exists():
        raise WatchFolderMissing(f"the watch folder {folder} is not a folder")
    if not create:
        raise WatchFolderMissing(
            f"the watch folder {folder} does not exist (is its share mounted?); "
            "create it, or pass --create-watch (config: create_watch = true) to have it made"
        )
    folder.mkdir(parents=True, exist_ok=True)
