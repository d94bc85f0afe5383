"""Every file the pack writes is written whole or not at all.

A file goes first into a temporary file beside it (same folder, hence same file system), is
flushed to the disk (``fsync``) and then renamed over its name with ``os.replace``, which is
atomic: a reader, a crash or a full disk finds the old file or the new one, never a part of one.
An ``fsync`` of the folder then makes the rename itself durable (POSIX). A write that fails
removes its temporary file; only a kill in the middle of a write leaves one behind, named
``.NAME.<random>.tmp``, never ``NAME``.

Every ``OSError`` becomes an ``OutputError`` that names the file, the reason and the fix. The
one file not written this way is the evaluation's append-only results file, which has its own
crash rules (``csg.evaluation.results``).

``hold_folder`` keeps a second process out of a folder: an OS lock (``flock``; ``msvcrt.locking``
on Windows) on a file in it, which the kernel releases when the process ends however it ends, so
a crash or a SIGKILL never leaves it stuck. The file names the holder (pid, host, start time) for
the message of the process it refuses.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import sys
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from .errors import OutputError

DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no space left, or over the user's quota


def cannot_write(path: Path, exc: OSError) -> OutputError:
    """The error for a write to ``path`` that failed with ``exc``."""
    if exc.errno in DISK_FULL:
        fix = "Free some space on that disk (or write somewhere else), then run again."
    else:
        fix = "Check that its folder exists and is writable (or write somewhere else), then run again."
    return OutputError(f"Could not write {path} ({exc.strerror or exc}). {fix}")


def write_file(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """``path`` written whole or not at all by ``write(handle)``; returns ``path``."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # 0o666 less the umask, as a plain open() gives (mkstemp's 0o600 would hide the file from the group)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            with suppress(OSError):
                temp.unlink()
            raise
    except OSError as exc:
        raise cannot_write(path, exc) from None
    sync_folder(path.parent)
    return path


def sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Best effort: Windows cannot open a folder, some file systems
    (FUSE, SMB) refuse the fsync, and the file is in place either way."""
    if os.name == "nt":
        return
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: Path, data: bytes) -> Path:
    return write_file(path, lambda handle: handle.write(data))


def write_text(path: Path, text: str, errors: str = "strict") -> Path:
    """``text`` as UTF-8, newlines as they are on every platform."""
    return write_bytes(path, text.encode("utf-8", errors))


def save_image(image: Image.Image, path: Path, **options) -> Path:
    """``image`` in the format its file name's extension names (``.png``, ``.jpg`` ...)."""
    path = Path(path)
    image_format = Image.registered_extensions()[path.suffix.lower()]
    return write_file(path, lambda handle: image.save(handle, format=image_format, **options))


def make_folder(folder: Path) -> Path:
    """``folder`` and its parents, created where missing."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(Path(folder), exc) from None
    return Path(folder)


HOLDER_BYTES = 4096  # a holder record is under 200 bytes; a bigger file is not one of ours
WINDOWS_LOCK_OFFSET = 2**30  # Windows locks are mandatory: the locked byte lies past the record, which stays readable
HELD = {errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK, errno.EDEADLK}  # what a lock held by another gives


def try_lock(fd: int) -> bool:
    """Lock the open file ``fd`` for this process without waiting; False when another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in HELD:
            return False
        raise
    return True


def holder(record: bytes) -> str:
    """Who holds a lock, from its lock file's record."""
    try:
        fields = json.loads(record)
        return (f"{fields['program']} (pid {fields['pid']} on host {fields['host']!r}, running since "
                f"{fields['started']})")
    except (ValueError, TypeError, KeyError):  # an empty record: the holder took the lock a moment ago
        return "another process (it has not written its pid yet)"


def hold_folder(folder: Path, program: str) -> BinaryIO:
    """Hold ``folder`` for this process, until the returned file (``folder/.PROGRAM.lock``) is closed or the
    process ends.

    Raises:
        OutputError: another process holds it (the message names that process), or the lock file cannot
            be written.
    """
    path = Path(folder) / f".{program}.lock"
    try:
        handle = open(path, "a+b")  # created if missing, never truncated: the record is the holder's
    except OSError as exc:
        raise cannot_write(path, exc) from None
    try:
        locked = try_lock(handle.fileno())
    except OSError as exc:  # a file system without locks (some network mounts): warn, do not refuse the run
        print(f"{program}: warning: cannot lock {path} ({exc.strerror}); make sure no other {program} writes "
              f"into {folder} meanwhile.", file=sys.stderr)
        return handle
    if not locked:
        handle.seek(0)
        record = handle.read(HOLDER_BYTES)
        handle.close()
        raise OutputError(f"{folder} is in use by {holder(record)}. Wait until it ends, or choose another folder. "
                          f"(Its lock ends with it, even if it crashes; {path} needs no deleting.)")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", " UTC")
    record = {"program": program, "pid": os.getpid(), "host": socket.gethostname(), "started": started}
    try:
        handle.truncate(0)
        handle.write(json.dumps(record).encode() + b"\n")
        handle.flush()
    except OSError as exc:
        handle.close()
        raise cannot_write(path, exc) from None
    return handle
