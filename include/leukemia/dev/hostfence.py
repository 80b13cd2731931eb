"""One machine standing for several hosts: each worker's host name and the fence around its disk.

The multi-worker stack (`leukemia.dev.stack`) runs its Celery workers on one machine, each in a
folder of its own. So that a task cannot quietly read what a task on another "host" left on local
disk, every worker process installs an audit hook (PEP 578) when it starts, through the
`sitecustomize.py` that the stack writes into the worker's own folder: opening, listing, renaming or
removing a path inside the stack's folder but outside the worker's own is written to the worker's
fence log and fails with `FileNotFoundError`, as it would on another machine.

What the hook cannot see: files opened from C (h5py, TensorFlow's own file system) and `os.stat`.
The stack's XCom audit covers the hand-offs themselves, whatever opens them.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Environment variables that configure a fenced process (the stack sets them per worker).
HOST_VARIABLE = "LEUKEMIA_STACK_HOST"
FENCE_ROOT_VARIABLE = "LEUKEMIA_FENCE_ROOT"
FENCE_ALLOW_VARIABLE = "LEUKEMIA_FENCE_ALLOW"
FENCE_LOG_VARIABLE = "LEUKEMIA_FENCE_LOG"

#: Audit events that name files, and how many of their leading arguments are paths.
PATH_EVENTS: dict[str, int] = {
    "open": 1,
    "os.listdir": 1,
    "os.scandir": 1,
    "os.rename": 2,  # os.rename and os.replace
    "os.remove": 1,  # os.remove and os.unlink
    "os.rmdir": 1,
    "os.mkdir": 1,
    "os.link": 2,
    "os.symlink": 2,
    "os.truncate": 1,
    "os.chmod": 1,
    "os.utime": 1,
    "shutil.copyfile": 2,
    "shutil.copytree": 2,
    "shutil.rmtree": 1,
    "glob.glob": 1,
}


def hostname() -> str:
    """The host name Airflow records for a task (`[core] hostname_callable` of each stack worker)."""
    return os.environ.get(HOST_VARIABLE) or socket.getfqdn()


def _as_path(arg: Any) -> str | None:
    """A normalised absolute path for a path argument; None for file descriptors and the like."""
    if isinstance(arg, os.PathLike):
        arg = os.fspath(arg)
    if isinstance(arg, bytes):
        arg = os.fsdecode(arg)
    if not isinstance(arg, str) or not arg:
        return None
    return os.path.normpath(arg if os.path.isabs(arg) else os.path.join(os.getcwd(), arg))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


class Fence:
    """The audit hook: paths under `root` are off limits unless they are under one of `allowed`."""

    def __init__(self, host: str, root: str, allowed: Iterable[str], log_path: str) -> None:
        self.host = host
        self.root = os.path.normpath(root)
        self.allowed = tuple(os.path.normpath(a) for a in allowed)
        self.log_path = log_path
        self._local = threading.local()

    def is_foreign(self, path: str) -> bool:
        """True for a path on another host's disk."""
        return _inside(path, self.root) and not any(_inside(path, a) for a in self.allowed)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        count = PATH_EVENTS.get(event)
        if count is None or getattr(self._local, "busy", False):
            return
        for arg in args[:count]:
            path = _as_path(arg)
            if path is not None and self.is_foreign(path):
                self._record(event, path)
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"not on this host ({self.host}): the path is on another worker's local disk",
                    path,
                )

    def _record(self, event: str, path: str) -> None:
        """Append one JSON line to the fence log (O_APPEND: lines from several processes stay whole)."""
        line = {
            "host": self.host,
            "pid": os.getpid(),
            "event": event,
            "path": path,
            "dag_id": os.environ.get("AIRFLOW_CTX_DAG_ID", ""),
            "task_id": os.environ.get("AIRFLOW_CTX_TASK_ID", ""),
            "run_id": os.environ.get("AIRFLOW_CTX_DAG_RUN_ID", ""),
        }
        self._local.busy = True
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(line) + "\n").encode())
            finally:
                os.close(fd)
        finally:
            self._local.busy = False


def install() -> Fence | None:
    """Install the fence that the environment describes (the worker's sitecustomize calls this).

    Does nothing when `LEUKEMIA_FENCE_ROOT` is unset, so the same interpreter runs unfenced elsewhere.
    """
    root = os.environ.get(FENCE_ROOT_VARIABLE)
    if not root:
        return None
    allowed = [a for a in os.environ.get(FENCE_ALLOW_VARIABLE, "").split(os.pathsep) if a]
    host = hostname()
    log_path = os.environ.get(FENCE_LOG_VARIABLE) or os.path.join(root, f"fence-{host}.jsonl")
    fence = Fence(host, root, allowed, log_path)
    marker_path(log_path).write_text(f"{os.getpid()}\n")  # before the hook: always allowed
    sys.addaudithook(fence)
    return fence


def marker_path(log_path: str | Path) -> Path:
    """The file a fenced process writes when its fence is up (the stack checks it at start)."""
    return Path(f"{log_path}.on")


def sitecustomize_source() -> str:
    """The `sitecustomize.py` that installs the fence in every Python process of a worker."""
    return (
        '"""Written by leukemia.dev.stack: fence this worker off from the other workers\' disks."""\n'
        "from leukemia.dev.hostfence import install\n\n"
        "install()\n"
    )


def read_log(path: Path) -> list[dict[str, str]]:
    """The fence log's entries (none when the file does not exist: nothing was crossed)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
