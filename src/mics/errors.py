"""Which exceptions are the user's to fix, and the one-line message each gets on the command line.

Two kinds: the project's own error types (bad data, options, run folders, checkpoints, a diverging loss),
whose messages already name the file or value and what to do, and errors the operating system raises
while mics reads inputs or writes a run folder, bench folder, predictions or figures (permission denied,
a path through a regular file, read-only file system, full disk, too many open files...). Those are
turned into a message by their ``errno`` here, in one place, instead of a ``try`` around every write.

Stdlib only, and the project's error classes are looked up in ``sys.modules`` rather than imported: the
command line uses this module before (or without) importing torch, and an error of a type whose module
was never imported cannot have been raised.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# (module, class): exceptions whose message is written for the user as it stands
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("mics.config", "ConfigError"),
    ("mics.data.errors", "DataError"),
    ("mics.pipeline", "RunError"),
    ("mics.engine.checkpoint", "CheckpointError"),
    ("mics.engine.train", "NonFiniteLossError"),
)

_FREE_SPACE = "free some space (or choose a folder on another disk)"
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


def user_message(err: BaseException, *, retry: str = "run the same command again") -> str | None:
    """The message to print for ``err``, or None when ``err`` is a bug (show its traceback).

    ``retry`` completes the advice after an error that stopped work halfway (a full disk, too many open
    files): the caller knows whether its command resumes with ``--resume``.
    """
    if isinstance(err, OSError):
        return os_error_message(err, retry=retry)
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(err, cls):
            return str(err)
    return None


def os_error_message(err: OSError, *, retry: str = "run the same command again") -> str | None:
    """One line naming the path and what to do, for an error of the operating system (it has an
    ``errno``); None for an OSError that did not come from the system (a library's own, e.g. an image
    decoder's), which is a bug here since inputs are checked before they are used."""
    code = err.errno
    if code is None:
        return None
    path = _path(err)
    where = path or "a file (rerun with --debug to see which)"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}; give this user access to it (chmod/chown) or choose another path"
    if code == errno.EROFS:
        return f"{where} is on a read-only file system; choose a writable folder (e.g. another --out)"
    if code == errno.ENOTDIR:
        return (
            f"{where}: a part of this path is a regular file, not a folder; choose another path "
            f"(or move that file away)"
        )
    if code == errno.EISDIR:
        return f"{where} is a folder where a file was expected; give the path of a file"
    if code == errno.EEXIST:
        return f"{where} already exists and is not a folder mics can use; choose another path"
    if code == errno.ENOENT:
        return f"{where} does not exist; check the path (relative paths start at {Path.cwd()})"
    if code in _NO_ROOM:
        disk = f"the disk holding {path}" if path else "a disk mics writes to"
        return f"no space left on {disk}; {_FREE_SPACE}, then {retry}: finished work is kept"
    if code in (errno.EMFILE, errno.ENFILE):
        return (
            f"too many open files (opening {where}); raise the limit (e.g. `ulimit -n 4096`) or run fewer "
            f"jobs at once, then {retry}: finished work is kept"
        )
    if code == errno.ENAMETOOLONG:
        return f"path too long: {where}; choose a shorter path"
    if code == errno.EIO:
        return f"input/output error on {where}: check the disk (or network share), then {retry}"
    reason = err.strerror or errno.errorcode.get(code, f"error {code}")
    return f"{where}: {reason}; check the path and the disk, then {retry}"


def _path(err: OSError) -> str | None:
    if err.filename is None:
        return None
    if err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}"
    return str(err.filename)


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Make an OSError raised inside name ``path``.

    A failed ``write`` (a full disk) raises without a file name, and a failed temporary file of an atomic
    write is named after that hidden temporary file: the user should read the file mics was writing.
    """
    try:
        yield
    except OSError as err:
        name = None if err.filename is None else Path(str(err.filename)).name
        if name is None or (name.startswith(".") and name.endswith(".tmp")):
            err.filename = str(path)
            err.filename2 = None
        raise
