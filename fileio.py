"""Files written whole or not at all: every file this project writes for a user (drawings, JSON Lines, checkpoints)
goes to a temporary name in the target's own directory and is renamed into place only when complete.

A rename within one directory is atomic on POSIX filesystems (and os.replace on Windows), so a reader, a second
run writing the same path, Ctrl-C or a full disk never leave a truncated file or one run's bytes after
another's: the target holds the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl  # POSIX; Windows has no flock, and runs there are not locked
except ImportError:
    fcntl = None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `target`; when the block ends without an exception, move it onto
    `target` (replacing it), otherwise delete it. fsync=True flushes the file to disk before the rename, for
    files that must survive a power cut once they exist (checkpoints, merged outputs).

    The temporary file is created empty with the umask's permissions (as a plain open() would make the target),
    hidden (a leading "."), and named uniquely, so concurrent writers of one target never share it.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never follow or reuse something already at that name; 0o666 & ~umask, as open(target, "w") would.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def fsync_dir(directory: Path) -> None:
    """A rename itself on disk (POSIX: a directory entry is durable once its directory is fsynced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """An exclusive lock on `path` (created empty if absent, and left in place: removing a lock file races with
    the next run opening it): its open descriptor, held until closed or the process ends (also by kill -9), or
    None when another process holds it. Where flock does not exist, -1: no lock, nothing to close."""
    if fcntl is None:
        return -1
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
