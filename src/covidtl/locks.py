"""One process at a time on a folder of results: two trainings of one cell would mix their files.

`hold(folder)` takes an flock on `.<name>.covidtl.lock` beside the folder (so removing the folder
keeps it, and DVC, told by .dvcignore, never hashes it). The file names the holder: pid, host,
start time and command line, for the one-line refusal a second process gets. The kernel drops an
flock when its process ends, however it ends: a file left by a killed holder is taken over, with a
line saying so. A clean end removes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

from covidtl.errors import UserError

LOCK_SUFFIX = ".covidtl.lock"  # .dvcignore and .gitignore: .*.covidtl.lock
HOLDER_WRITE_WAIT_S = 2.0  # a holder writes its name just after locking: how long to wait for it

log = logging.getLogger(__name__)


class FolderBusy(UserError):
    """The folder is locked by another live process."""


def lock_path(target: str | Path) -> Path:
    """The lock file of a folder (or of a single output file): a hidden file beside it."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def hold(target: str | Path, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold `target`'s lock for the block (`what`: what the holder does, e.g. "covidtl train").
    Another holder: FolderBusy naming it, or with `wait` (a cache entry being built) wait for it."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, target, wait)
    try:
        gone = _read(fd)
        if gone:
            log.warning(f"Note: {target}: took over the lock of {describe(gone)}, a process that is gone (killed?)")
        _write(fd, {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]})
        yield path
    finally:
        # Removed while still held: whoever opened it meanwhile finds it gone and locks a new one.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def describe(holder: dict) -> str:
    """`covidtl train (pid 123 on host, started ...: covidtl train --dataset ct)`."""
    return (f"{holder.get('what', 'a process')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}: {holder.get('command', '?')})")


def _acquire(path: Path, target: str | Path, wait: bool) -> int:
    """An fd of the lock file there now, locked. Another holder: FolderBusy naming it, or, with
    `wait`, a warning naming it and a wait for the lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            named = describe(holder) if holder else "another process"
            if not wait:
                os.close(fd)
                raise FolderBusy(f"{target}: in use by {named}; two at once would mix their files: wait "
                                 "for it to end (or stop it) and run this again") from None
            log.warning(f"{target}: waiting for {named}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder removed it between our open and our lock: lock the new one


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> dict:
    """The holder's record, waiting a moment for a holder that has locked but not yet written it."""
    deadline = time.monotonic() + HOLDER_WRITE_WAIT_S
    while not (holder := _read(fd)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


def _read(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # cut short by a kill while it was written: a holder all the same
        return {"what": "a process whose record is unreadable"}
    return record if isinstance(record, dict) else {}


def _write(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
