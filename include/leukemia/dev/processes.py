"""Server processes of the local stack: start each with a log file of its own, wait, stop them all.

What every service of `leukemia.dev.stack` needs from the operating system, whatever it serves: a
free port, a console script of this environment, a clean environment to start from, and a process
group that is stopped whole (each process with the signal that stops it cleanly, SIGKILL for what
is left). Development tooling, never imported by production code.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 15.0


class StackError(RuntimeError):
    """The stack could not be brought up or driven; the message says what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def as_user(user: str | None) -> dict[str, Any]:
    """`subprocess` arguments that run a command as `user` with only that user's group."""
    return {"user": user, "group": user, "extra_groups": []} if user else {}


def venv_command(name: str) -> str:
    """A console script of this interpreter's environment (`airflow`, `mlflow`)."""
    path = Path(sys.executable).with_name(name)
    if not path.is_file():
        raise StackError(f"{path} not found: install the project (make venv)")
    return str(path)


def base_env() -> dict[str, str]:
    """This environment without any Airflow, MLflow, AWS or pipeline setting of the caller's."""
    drop = ("AIRFLOW", "LEUKEMIA_", "MLFLOW_", "AWS_", "KERAS_HOME", "PYTHONPATH")
    base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    no_proxy = ",".join(filter(None, [base.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
    base.update(NO_PROXY=no_proxy, no_proxy=no_proxy, TF_CPP_MIN_LOG_LEVEL="2")
    base["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return base


@dataclass
class Service:
    """One server process of the stack, its log file, and the signal that stops it cleanly."""

    name: str
    proc: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM
    database: bool = False  # PostgreSQL and Redis stop last: the others talk to them

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def stop_services(services: Sequence[Service], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop processes and all they started: each one's signal at once, SIGKILL for what is left."""
    import psutil

    family: list[psutil.Process] = []
    for service in services:
        try:
            parent = psutil.Process(service.proc.pid)
            family += [parent, *parent.children(recursive=True)]
            parent.send_signal(service.stop_signal)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout_s)
    for proc in alive:
        try:
            log.warning(
                "SIGKILL to %s (pid %d), still running after %.0f s",
                proc.name(),
                proc.pid,
                timeout_s,
            )
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    for service in services:
        try:
            service.proc.wait(timeout=5)  # reap it
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not exit", service.name, service.proc.pid)


class Processes:
    """The stack's server processes: each started with its log in `log_dir`, all stopped at once."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.services: list[Service] = []

    def spawn(
        self,
        name: str,
        cmd: list[str],
        environ: dict[str, str],
        cwd: Path,
        stop_signal: int = signal.SIGTERM,
        user: str | None = None,
        database: bool = False,
    ) -> Service:
        """Start `cmd` in a session of its own, its output appended to `<log_dir>/<name>.log`."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=environ,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the harness, not them
                **as_user(user),
            )
        service = Service(name, proc, log_path, stop_signal, database)
        self.services.append(service)
        return service

    def named(self, name: str) -> list[Service]:
        return [s for s in self.services if s.name == name]

    def wait(
        self, what: str, check: Callable[[], bool], watch: Sequence[Service], timeout_s: float
    ) -> None:
        """Poll `check` until it is true; fail at once when a watched process exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            for service in watch:
                if not service.alive():
                    raise StackError(
                        f"{service.name} exited with code {service.proc.returncode} while "
                        f"waiting for {what}; its log ({service.log}) ends:\n{service.tail()}"
                    )
            try:
                if check():
                    return
            except Exception as exc:  # not ready yet
                last = exc
            else:
                last = None
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {s.name} ({s.log}):\n{s.tail(1500)}" for s in watch)
                raise StackError(
                    f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last})\n{logs}"
                )
            time.sleep(0.5)

    def check_alive(self, during: str) -> None:
        """Raise with a process's log when one of them has died."""
        for service in self.services:
            if not service.alive():
                raise StackError(
                    f"{service.name} died during {during}; its log ends:\n{service.tail()}"
                )

    def stop(self) -> None:
        """Stop every process: the servers first, then the databases they talk to."""
        for databases in (False, True):
            batch = [s for s in self.services if s.database == databases]
            try:
                stop_services(batch)
            except Exception:  # keep stopping the others
                log.exception("could not stop %s", ", ".join(s.name for s in batch))
        self.services.clear()
