"""One writer per workdir: an advisory lock that the operating system releases on any exit.

    held = workdir.lock(path)   # raises WorkdirBusyError naming the holder
    ...                         # the run; keep `held` referenced until the process ends

Two runs writing the same workdir corrupt each other's checkpoints and metrics. `lock` takes
``fcntl.flock`` on ``<workdir>/lock``: the kernel drops the lock when the holder's file is
closed, which includes every way a process can end (kill -9 as well), so a lock left by a dead
run is never stale; the file's content (pid, host, start time) is only there to name the holder
in the refusal. flock is local to a machine and not reliable on every network filesystem (NFS
may not propagate it); in a multi-process job only process 0 takes it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
from typing import IO

__all__ = ["LOCK_NAME", "WorkdirBusyError", "lock"]

LOCK_NAME = "lock"


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


def lock(workdir: str | os.PathLike) -> IO[str]:
    """Takes the workdir's lock for the rest of this process (or until the file is closed).

    Args:
        workdir: The run's folder; created if missing.

    Returns:
        The open lock file. The lock lasts as long as it stays open: keep a reference.

    Raises:
        WorkdirBusyError: Another process holds it; the message names its pid, host and start.
    """
    path = pathlib.Path(workdir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+": opening must not truncate the holder's record before we know we hold the lock.
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - returned to the caller
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        text = handle.read()
        handle.close()
        try:
            holder = json.loads(text)
            who = (
                f"pid {holder['pid']} on {holder['host']} (started {holder['started']}, "
                f"command: {holder['command']})"
            )
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise WorkdirBusyError(
            f"workdir {pathlib.Path(workdir)} is in use by {who}; wait for it to finish, stop "
            f"it, or choose another --workdir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
            }
        )
        + "\n"
    )
    handle.flush()
    return handle
