"""Which processes are alive, and which have a pool mapped.

A pool outlives the processes that use it: a dead writer's reservation, a dead reader's
counter slot and a half-built pool file are reclaimed by asking the kernel whether their
pid still runs. `my_pid` is this process's pid, kept current by an at-fork hook, so hot
paths notice a fork by comparing it with the pid a Pool was opened in (no getpid syscall).
"""

from __future__ import annotations

import os
from pathlib import Path

my_pid = os.getpid()


def _after_fork() -> None:
    global my_pid
    my_pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def pid_alive(pid: int) -> bool:
    """True unless `pid` is gone or a zombie (a SIGKILLed child not yet reaped holds no lock)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def attached_pids(path: str | os.PathLike[str]) -> list[int]:
    """Processes that have the pool's file mapped, matched by device and inode in /proc/*/maps.

    By inode because a pool is formatted under a temporary name and linked into place, so
    maps may show the old name; other users' processes may be hidden from us.
    """
    try:
        st = os.stat(path)
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    ino = str(st.st_ino)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "maps", "r", errors="replace") as handle:
                for line in handle:
                    fields = line.split(maxsplit=5)
                    if len(fields) >= 5 and fields[4] == ino and fields[3] == dev:
                        pids.append(int(entry.name))
                        break
        except OSError:
            continue
    return sorted(pids)
