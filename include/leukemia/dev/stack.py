"""The production stack on one machine: Airflow 3 on Celery with two workers that share no disk.

Real server processes on 127.0.0.1, started and stopped here: PostgreSQL (Airflow's metadata
database and MLflow's backend), Redis (the Celery broker), moto's S3 server (the images bucket and
MLflow's artifact bucket), an MLflow tracking server (`--serve-artifacts` into that bucket), and
Airflow with the CeleryExecutor: scheduler, dag-processor, api-server and N Celery workers.

Each worker stands for a host of its own: its own empty folder (`LEUKEMIA_DATA_DIR`, `HOME`,
`TMPDIR`, its Airflow home with the task logs), its own host name (what Airflow records for each task
instance) and a fence (`leukemia.dev.hostfence`) that hides every other folder of the stack from it
and records each attempt to reach one.

The DAG is driven as the UI drives it: a token from `/auth/token`, then Airflow's REST API v2.
Development tooling (the multi-worker test, `bench/scale.py`), never imported by production code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES, env, project_root
from leukemia.dev.demo import DEMO_POLICY

log = logging.getLogger(__name__)

DAG_ID = "leukemia_training"
ARTIFACT_BUCKET = "mlflow-artifacts"
DB_USER = "airflow"
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 15.0


class StackError(RuntimeError):
    """The stack could not be brought up or driven; the message says what to do."""


class ShareNothingViolation(AssertionError):
    """A task reached another worker's disk, or XCom carried a local path from one task to another."""


# --------------------------------------------------------------------------------------------
# servers and binaries
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bin() -> Path:
    """The folder holding PostgreSQL's `initdb` and `postgres` (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise StackError("PostgreSQL server not found (initdb, postgres): apt-get install postgresql")


def redis_server() -> str:
    """Path of `redis-server`."""
    found = shutil.which("redis-server")
    if not found:
        raise StackError(
            "redis-server not found: apt-get install redis-server (make test does this as root)"
        )
    return found


def postgres_user() -> str | None:
    """The account PostgreSQL runs as: None (this one) unless we are root, which it refuses."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        raise StackError(
            "PostgreSQL refuses to run as root and there is no 'postgres' account to run it as: "
            "apt-get install postgresql creates one"
        ) from None


def _as_user(user: str | None) -> dict[str, Any]:
    """`subprocess` arguments that run a command as `user` with only that user's group."""
    return {"user": user, "group": user, "extra_groups": []} if user else {}


def venv_command(name: str) -> str:
    """A console script of this interpreter's environment (`airflow`, `mlflow`)."""
    path = Path(sys.executable).with_name(name)
    if not path.is_file():
        raise StackError(f"{path} not found: install the project (make venv)")
    return str(path)


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


def http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, Any]:
    """One JSON request; returns (status, decoded body). Status 0: nothing answers."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(request, timeout=timeout_s) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except OSError:
        return 0, None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


# --------------------------------------------------------------------------------------------
# the stack
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """A Celery worker standing for one host: its name and its own folder."""

    name: str
    root: Path
    cpu: int | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def fence_log(self) -> Path:
        return self.root / "fence.jsonl"


@dataclass(frozen=True)
class TaskRecord:
    """One task instance of a DAG run, as the REST API reports it."""

    task_id: str
    map_index: int
    state: str | None
    hostname: str | None
    start: datetime | None
    end: datetime | None
    try_number: int

    @property
    def label(self) -> str:
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return (self.end - self.start).total_seconds()


@dataclass(frozen=True)
class RunResult:
    """A finished (or abandoned) DAG run: its state, task instances and what crossed hosts."""

    run_id: str
    state: str
    tasks: list[TaskRecord]
    wall_s: float
    fence_hits: list[dict[str, str]] = field(default_factory=list)
    xcom_paths: list[str] = field(default_factory=list)

    def of(self, task_id: str) -> list[TaskRecord]:
        return [t for t in self.tasks if t.task_id == task_id]

    def hosts(self, task_id: str) -> set[str]:
        return {t.hostname for t in self.of(task_id) if t.hostname}

    def span_s(self, task_id: str) -> float | None:
        """Wall time of a (mapped) task: first start to last end of its instances."""
        spans = [(t.start, t.end) for t in self.of(task_id) if t.start and t.end]
        if not spans:
            return None
        return (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()

    def share_nothing_report(self) -> list[str]:
        """One line per breach of share-nothing; empty when the run kept to its own disks."""
        lines = [
            f"{h.get('host')}: task {h.get('task_id') or '?'} ({h.get('event')}) reached "
            f"{h.get('path')}"
            for h in self.fence_hits
        ]
        lines += [f"XCom carries a local path: {p}" for p in self.xcom_paths]
        return lines


def log_errors(text: str, limit: int = 5) -> list[str]:
    """`event: ExcType: message` for the error lines of a task log (Airflow 3 writes JSON lines)."""
    errors = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("level") not in ("error", "critical"):
            continue
        details = entry.get("error_detail") or [{}]
        exc = details[-1]
        frames = exc.get("frames", [])
        where = [
            f for f in frames if "/leukemia/" in f["filename"] and "/dev/" not in f["filename"]
        ]
        place = f" at {where[-1]['filename']}:{where[-1]['lineno']}" if where else ""
        cause = f": {exc.get('exc_type')}: {exc.get('exc_value')}" if exc.get("exc_type") else ""
        errors.append(f"{entry.get('event')}{cause}{place}"[:600])
    return errors[-limit:]


def s3_keys() -> dict[str, str]:
    """AWS variables for the local S3 server (moto accepts any key; these are never real ones)."""
    from leukemia.dev.embedded import LOCAL_ACCESS_KEY, LOCAL_REGION, LOCAL_SECRET_KEY

    return {
        "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
        "AWS_DEFAULT_REGION": LOCAL_REGION,
    }


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


class Stack:
    """Bring the stack up with `start()` (or `with Stack(...)`), drive it, and `stop()` it.

    `stop()` always stops every process that `start()` started, whatever state they are in.
    """

    def __init__(
        self,
        root: Path,
        workers: int = 2,
        cpus: Sequence[int] | None = None,
        training_slots: int = 2,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        if cpus is not None and len(cpus) != workers:
            raise ValueError(f"give one core per worker: {workers} workers, cpus={list(cpus)}")
        self.root = Path(os.path.realpath(root))
        self.training_slots = training_slots
        self.extra_env = dict(extra_env or {})
        names = [f"worker-{chr(ord('a') + i)}" for i in range(workers)]
        self.workers = [
            Worker(n, self.root / "workers" / n, cpus[i] if cpus is not None else None)
            for i, n in enumerate(names)
        ]
        self.client = Worker("client", self.root / "client")
        self.bucket = env("LEUKEMIA_BUCKET")
        self.services: list[Service] = []
        self._pg_dir: Path | None = None
        self._token: str | None = None
        self._previous_sigterm: Any = None
        self._secrets = {
            k: secrets.token_urlsafe(24) for k in ("db", "redis", "admin", "jwt", "api")
        }
        self.ports: dict[str, int] = {}

    # ---- addresses -------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def _db_url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return (
            f"{driver}://{DB_USER}:{self._secrets['db']}@127.0.0.1:{self.ports['postgres']}/"
            f"{database}"
        )

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Stack:
        """Start every server, wait until each answers, and the DAG is parsed and workers ready."""
        for folder in (self.root / "logs", self.root / "control", self.client.root):
            folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self._stop_on_sigterm()
        try:
            self._start_s3()
            self._start_postgres()
            self._start_redis()
            self._start_mlflow()
            self._start_airflow()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info(
            "Stack up in %.0f s: API %s, MLflow %s",
            time.monotonic() - started,
            self.api_url,
            self.mlflow_url,
        )
        return self

    def _stop_on_sigterm(self) -> None:
        """Turn SIGTERM (a CI time-out, `kill`) into SystemExit, so that `stop()` still runs."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):

            def leave(signum: int, frame: object) -> None:
                raise SystemExit(128 + signum)

            self._previous_sigterm = signal.signal(signal.SIGTERM, leave)

    def stop(self) -> None:
        """Stop every process: Airflow and MLflow first, then the databases they talk to."""
        for databases in (False, True):
            batch = [s for s in self.services if s.database == databases]
            try:
                stop_services(batch)
            except Exception:  # keep stopping the others
                log.exception("could not stop %s", ", ".join(s.name for s in batch))
        self.services.clear()
        if self._pg_dir is not None:
            shutil.rmtree(self._pg_dir, ignore_errors=True)
            self._pg_dir = None
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _spawn(
        self,
        name: str,
        cmd: list[str],
        environ: dict[str, str],
        cwd: Path,
        stop_signal: int = signal.SIGTERM,
        user: str | None = None,
        database: bool = False,
    ) -> Service:
        log_path = self.root / "logs" / f"{name}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=environ,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the harness, not them
                **_as_user(user),
            )
        service = Service(name, proc, log_path, stop_signal, database)
        self.services.append(service)
        return service

    def _wait(
        self, what: str, check: Callable[[], bool], watch: Sequence[Service], timeout_s: float
    ) -> None:
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

    # ---- the servers -----------------------------------------------------------------------

    def _start_s3(self) -> None:
        """moto's S3 server in a process of its own (its buckets live and die with this stack)."""
        self.ports["s3"] = free_port()
        environ = {**self._base_env(), "PYTHONPATH": str(project_root() / "include")}
        cmd = [sys.executable, "-m", "leukemia", "s3-server", "--port", str(self.ports["s3"])]
        server = self._spawn(
            "s3", cmd, environ, self.root / "control", signal.SIGINT, database=True
        )
        self._wait("the S3 server", lambda: http("GET", self.s3_url)[0] == 200, [server], 60)
        client = self.s3_client()
        for bucket in (self.bucket, ARTIFACT_BUCKET):
            client.create_bucket(Bucket=bucket)

    def s3_client(self) -> Any:
        """A boto3 client of the stack's S3 server (the harness's own; tasks use the connection)."""
        import boto3

        from leukemia.dev.embedded import LOCAL_ACCESS_KEY, LOCAL_REGION, LOCAL_SECRET_KEY

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=LOCAL_ACCESS_KEY,
            aws_secret_access_key=LOCAL_SECRET_KEY,
            region_name=LOCAL_REGION,
        )

    def _start_postgres(self) -> None:
        binaries = postgres_bin()
        user = postgres_user()
        self._pg_dir = Path(tempfile.mkdtemp(prefix="leukemia-stack-pg-"))  # reachable by `user`
        password_file = self._pg_dir / "password"
        password_file.write_text(self._secrets["db"] + "\n")
        if user:
            entry = pwd.getpwnam(user)
            for path in (self._pg_dir, password_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        data = self._pg_dir / "data"
        environ = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": str(self._pg_dir)}
        initdb = [str(binaries / "initdb"), "-D", str(data), "-U", DB_USER]
        initdb += [f"--pwfile={password_file}", "--auth=scram-sha-256", "--no-sync"]
        initdb += ["--encoding=UTF8", "--locale=C"]
        init = subprocess.run(
            initdb, env=environ, cwd=self._pg_dir, capture_output=True, text=True, **_as_user(user)
        )
        if init.returncode != 0:
            raise StackError(f"initdb failed:\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
        self.ports["postgres"] = free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self._pg_dir),
            "max_connections": "200",
            # a throw-away cluster: durability buys nothing here
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        cmd = [str(binaries / "postgres"), "-D", str(data), "-p", str(self.ports["postgres"])]
        cmd += [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        # SIGINT: PostgreSQL's fast shutdown (SIGTERM waits for every client to leave)
        server = self._spawn(
            "postgres", cmd, environ, self._pg_dir, signal.SIGINT, user=user, database=True
        )
        import psycopg2

        def connect() -> Any:
            return psycopg2.connect(
                host="127.0.0.1",
                port=self.ports["postgres"],
                user=DB_USER,
                password=self._secrets["db"],
                dbname="postgres",
                connect_timeout=3,
            )

        self._wait("PostgreSQL", lambda: connect().close() is None, [server], 60)
        db = connect()
        try:
            db.autocommit = True
            with db.cursor() as cur:
                cur.execute("CREATE DATABASE airflow")
                cur.execute("CREATE DATABASE mlflow")
        finally:
            db.close()

    def _start_redis(self) -> None:
        import redis

        self.ports["redis"] = free_port()
        folder = self.root / "control" / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [redis_server(), "--bind", "127.0.0.1", "--port", str(self.ports["redis"])]
        cmd += ["--requirepass", self._secrets["redis"], "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(folder), "--daemonize", "no"]
        server = self._spawn(
            "redis", cmd, {"PATH": os.environ.get("PATH", "")}, folder, database=True
        )
        client = redis.Redis(
            host="127.0.0.1", port=self.ports["redis"], password=self._secrets["redis"]
        )
        self._wait("Redis", lambda: bool(client.ping()), [server], 30)
        client.close()

    def _start_mlflow(self) -> None:
        self.ports["mlflow"] = free_port()
        environ = {
            **self._base_env(),
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            **s3_keys(),
            "HOME": str(self.root / "control"),
        }
        cmd = [venv_command("mlflow"), "server", "--backend-store-uri", self._db_url("mlflow")]
        cmd += ["--serve-artifacts", "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.ports["mlflow"]), "--workers", "1"]
        self._spawn("mlflow", cmd, environ, self.root / "control")

    def _base_env(self) -> dict[str, str]:
        """This environment without any Airflow, MLflow, AWS or pipeline setting of the caller's."""
        drop = ("AIRFLOW", "LEUKEMIA_", "MLFLOW_", "AWS_", "KERAS_HOME", "PYTHONPATH")
        base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        no_proxy = ",".join(filter(None, [base.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        base.update(NO_PROXY=no_proxy, no_proxy=no_proxy, TF_CPP_MIN_LOG_LEVEL="2")
        base["MLFLOW_DISABLE_TELEMETRY"] = "true"
        return base

    def airflow_env(self) -> dict[str, str]:
        """Settings every Airflow process shares (the compose file's x-airflow-common, locally)."""
        from cryptography.fernet import Fernet

        from leukemia.dev.embedded import aws_connection_json

        if "fernet" not in self._secrets:
            self._secrets["fernet"] = Fernet.generate_key().decode()
        root = project_root()
        settings = {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__FERNET_KEY": self._secrets["fernet"],
            "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple."
            "simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(
                self.root / "control" / "passwords.json"
            ),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secrets["jwt"],
            "AIRFLOW__API__SECRET_KEY": self._secrets["api"],
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self._db_url("airflow"),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://:{self._secrets['redis']}@127.0.0.1:"
            f"{self.ports['redis']}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": self._db_url("airflow", "db+postgresql+psycopg2"),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            # only runs triggered through the API: no catch-up run of the weekly schedule
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_AWS_DEFAULT": aws_connection_json(self.s3_url),
            **s3_keys(),
            "LEUKEMIA_BUCKET": self.bucket,
            "LEUKEMIA_TRAINING_QUEUE": "training",
            "LEUKEMIA_TRAINING_SLOTS": str(self.training_slots),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PYTHONPATH": str(root / "include"),
            # a tiny model: the gate only reports and nobody is asked; policy, as in production,
            # comes from the deployment's environment, never from the run's conf
            **DEMO_POLICY,
        }
        return {**self._base_env(), **settings, **self.extra_env}

    def host_env(self, host: Worker) -> dict[str, str]:
        """A worker's (or the client's) own settings: its folders, its host name, its fence."""
        from leukemia.dev.hostfence import sitecustomize_source

        for sub in ("data", "home", "tmp", "airflow", "site"):
            (host.root / sub).mkdir(parents=True, exist_ok=True)
        (host.root / "site" / "sitecustomize.py").write_text(sitecustomize_source())
        data_dir = host.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        allowed = [str(host.root)]
        environ = self.airflow_env()
        environ.update(
            {
                "AIRFLOW_HOME": str(host.airflow_home),
                "HOME": str(host.root / "home"),
                "TMPDIR": str(host.root / "tmp"),
                "MPLCONFIGDIR": str(host.root / "home" / ".matplotlib"),
                "LEUKEMIA_DATA_DIR": str(data_dir),
                "LEUKEMIA_STACK_HOST": host.name,
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "leukemia.dev.hostfence.hostname",
                "LEUKEMIA_FENCE_ROOT": str(self.root),
                "LEUKEMIA_FENCE_ALLOW": os.pathsep.join(allowed),
                "LEUKEMIA_FENCE_LOG": str(host.fence_log),
                "PYTHONPATH": os.pathsep.join([str(host.root / "site"), environ["PYTHONPATH"]]),
            }
        )
        return environ

    def _start_airflow(self) -> None:
        self.ports["api"] = free_port()
        control = self.root / "control"
        (control / "passwords.json").write_text(json.dumps({"admin": self._secrets["admin"]}))
        environ = {
            **self.airflow_env(),
            "AIRFLOW_HOME": str(control / "airflow"),
            "HOME": str(control),
        }
        (control / "airflow").mkdir(exist_ok=True)
        self._wait(
            "MLflow",
            lambda: http("GET", f"{self.mlflow_url}/health")[0] == 200,
            [s for s in self.services if s.name == "mlflow"],
            START_TIMEOUT_S,
        )
        airflow = venv_command("airflow")
        migrate = subprocess.run(
            [airflow, "db", "migrate"], env=environ, cwd=control, capture_output=True, text=True
        )
        if migrate.returncode != 0:
            raise StackError(
                f"airflow db migrate failed:\n{migrate.stdout[-2000:]}{migrate.stderr[-3000:]}"
            )
        api = [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.ports["api"])]
        self._spawn("api-server", [*api, "--workers", "1"], environ, control)
        self._spawn("scheduler", [airflow, "scheduler"], environ, control)
        self._spawn("dag-processor", [airflow, "dag-processor"], environ, control)
        for worker in self.workers:
            cmd = [airflow, "celery", "worker", "--celery-hostname", f"{worker.name}@stack"]
            cmd += ["--queues", "default,training", "--concurrency", "1"]
            # task logs stay on the worker (the harness reads them from its folder); nothing
            # listens beyond loopback
            cmd += ["--skip-serve-logs", "--without-mingle", "--without-gossip"]
            if worker.cpu is not None:
                taskset = shutil.which("taskset")
                if not taskset:
                    raise StackError("taskset not found: apt-get install util-linux")
                cmd = [taskset, "-c", str(worker.cpu), *cmd]
            self._spawn(worker.name, cmd, self.host_env(worker), worker.root)

    def _wait_ready(self) -> None:
        watch = list(self.services)
        self._wait(
            "the API server",
            lambda: http("GET", f"{self.api_url}/api/v2/monitor/health")[0] == 200,
            watch,
            START_TIMEOUT_S,
        )
        self._wait(
            f"the DAG {DAG_ID} to be parsed",
            lambda: self.api("GET", f"/dags/{DAG_ID}")[0] == 200,
            watch,
            START_TIMEOUT_S,
        )
        self._wait(
            "every Celery worker to answer a ping", self._workers_answer, watch, START_TIMEOUT_S
        )
        from leukemia.dev.hostfence import marker_path

        for worker in self.workers:
            if not marker_path(worker.fence_log).is_file():
                raise StackError(
                    f"{worker.name} runs without its fence ({worker.root / 'site'} was not imported "
                    f"as sitecustomize): see {self.root / 'logs' / worker.name}.log"
                )

    def _workers_answer(self) -> bool:
        from celery import Celery

        app = Celery(broker=self.airflow_env()["AIRFLOW__CELERY__BROKER_URL"])
        try:
            replies = app.control.ping(timeout=1.0)
        finally:
            app.close()
        answered = {name.split("@")[0] for reply in replies for name in reply}
        return answered >= {w.name for w in self.workers}

    # ---- driving Airflow as the UI does ----------------------------------------------------

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """One REST API v2 call as the admin user (the token is fetched once)."""
        if self._token is None:
            status, answer = http(
                "POST",
                f"{self.api_url}/auth/token",
                {"username": "admin", "password": self._secrets["admin"]},
            )
            if status not in (200, 201):
                raise StackError(f"no API token: /auth/token answered {status}: {answer}")
            self._token = answer["access_token"]
        return http(method, f"{self.api_url}/api/v2{path}", body, self._token)

    def dag_params(self, dag_id: str = DAG_ID) -> set[str]:
        """Names of the Params the served DAG accepts."""
        status, details = self.api("GET", f"/dags/{dag_id}/details")
        if status != 200:
            raise StackError(f"GET /dags/{dag_id}/details answered {status}: {details}")
        return set((details.get("params") or {}).keys())

    def seed_images(self, folder: Path, prefix: str | None = None) -> int:
        """Upload a <Class>/<name> folder of images to the images bucket; returns the count."""
        from concurrent.futures import ThreadPoolExecutor

        from leukemia.images import iter_image_files

        prefix = prefix or env("LEUKEMIA_RAW_PREFIX")
        client = self.s3_client()
        files = list(iter_image_files(Path(folder)))
        if not files:
            raise StackError(
                f"no images under {folder}: expected {folder}/<Benign|Early|Pre|Pro>/<name>.jpg"
            )

        def put(item: tuple[str, Path]) -> None:
            label, path = item
            client.put_object(
                Bucket=self.bucket, Key=f"{prefix}{label}/{path.name}", Body=path.read_bytes()
            )

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, files))
        return len(files)

    def trigger(self, conf: dict[str, Any], dag_id: str = DAG_ID) -> str:
        """Unpause the DAG and trigger a run with `conf`, as the UI's trigger form does."""
        status, answer = self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        if status != 200:
            raise StackError(f"could not unpause {dag_id}: {status} {answer}")
        status, answer = self.api(
            "POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf}
        )
        if status not in (200, 201):
            raise StackError(f"could not trigger {dag_id}: {status} {answer}")
        return str(answer["dag_run_id"])

    def task_instances(self, run_id: str, dag_id: str = DAG_ID) -> list[TaskRecord]:
        """Every task instance of a run, with the host each ran on."""
        run = urllib.parse.quote(run_id, safe="")
        status, answer = self.api("GET", f"/dags/{dag_id}/dagRuns/{run}/taskInstances?limit=1000")
        if status != 200:
            raise StackError(f"listing task instances answered {status}: {answer}")
        return [
            TaskRecord(
                t["task_id"],
                int(t["map_index"]),
                t.get("state"),
                t.get("hostname") or None,
                _parse_time(t.get("start_date")),
                _parse_time(t.get("end_date")),
                int(t.get("try_number") or 0),
            )
            for t in answer["task_instances"]
        ]

    def fence_hits(self) -> list[dict[str, str]]:
        """Every attempt of a worker (or the client) to reach a folder that is not its own."""
        from leukemia.dev.hostfence import read_log

        return [hit for host in [*self.workers, self.client] for hit in read_log(host.fence_log)]

    def xcom_local_paths(self, run_id: str, dag_id: str = DAG_ID) -> list[str]:
        """`task[map]: key = path` for each XCom of the run that names a file in the stack's folders."""
        run = urllib.parse.quote(run_id, safe="")
        base = f"/dags/{dag_id}/dagRuns/{run}/taskInstances"
        status, answer = self.api("GET", f"{base}/~/xcomEntries?limit=1000")
        if status != 200:
            raise StackError(f"listing XComs answered {status}: {answer}")
        pattern = re.compile(re.escape(str(self.root)) + r"[^\"'\s,}\]]*")
        found: dict[tuple[str, str], str] = {}  # (task, path) -> the XCom key that carries it
        for entry in answer.get("xcom_entries", []):
            key, task_id, index = entry["key"], entry["task_id"], int(entry["map_index"])
            status, value = self.api(
                "GET", f"{base}/{task_id}/xcomEntries/{urllib.parse.quote(key)}?map_index={index}"
            )
            text = json.dumps(value.get("value") if isinstance(value, dict) else value)
            label = task_id if index < 0 else f"{task_id}[{index}]"
            for path in pattern.findall(text):
                if key != "return_value" or (label, path) not in found:
                    found[(label, path)] = key  # a named key says more than return_value
        return [f"{label}: {key} = {path}" for (label, path), key in sorted(found.items())]

    def run(
        self,
        conf: dict[str, Any],
        timeout_s: float = 900.0,
        stop_at_first_breach: bool = False,
        dag_id: str = DAG_ID,
    ) -> RunResult:
        """Trigger one run and wait for it to finish (or for the first breach of share-nothing)."""
        started = time.monotonic()
        run_id = self.trigger(conf, dag_id)
        run = urllib.parse.quote(run_id, safe="")
        deadline = started + timeout_s
        state = "queued"
        while time.monotonic() < deadline:
            for service in self.services:
                if not service.alive():
                    raise StackError(
                        f"{service.name} died during the run; its log ends:\n{service.tail()}"
                    )
            status, answer = self.api("GET", f"/dags/{dag_id}/dagRuns/{run}")
            if status == 200:
                state = str(answer.get("state"))
            if state in ("success", "failed"):
                break
            if stop_at_first_breach and self.fence_hits():
                state = f"abandoned ({state}): a task reached another worker's disk"
                break
            time.sleep(2)
        else:
            state = f"timed out ({state}) after {timeout_s:.0f} s"
        return RunResult(
            run_id,
            state,
            self.task_instances(run_id, dag_id),
            time.monotonic() - started,
            self.fence_hits(),
            self.xcom_local_paths(run_id, dag_id),
        )

    def task_errors(self, record: TaskRecord) -> list[str]:
        """The errors in a task instance's latest log, read from whichever worker's folder holds it."""
        index = "" if record.map_index < 0 else f"map_index={record.map_index}/"
        pattern = f"logs/**/task_id={record.task_id}/{index}attempt=*.log"
        logs = sorted(
            (p for w in self.workers for p in w.airflow_home.glob(pattern)),
            key=lambda p: p.stat().st_mtime,
        )
        if not logs:
            return [f"no log of {record.label} in the workers' folders"]
        return [*log_errors(logs[-1].read_text(errors="replace")), f"(log: {logs[-1]})"]

    def diagnosis(self, result: RunResult) -> str:
        """The failed task instances of a run, each with the errors from its log."""
        failed = [t for t in result.tasks if t.state in ("failed", "up_for_retry")]
        lines = [f"run {result.run_id}: {result.state}"]
        for record in failed[:6]:
            lines.append(f"{record.label} on {record.hostname}: {record.state}")
            lines += [f"    {line}" for line in self.task_errors(record)]
        return "\n".join(lines)

    def predict(
        self, inputs: Sequence[str], timeout_s: float = 300.0
    ) -> subprocess.CompletedProcess:
        """`python -m leukemia predict` in a fresh process on a third host (empty folder, fenced)."""
        # the client needs the S3 connection and MLflow, not Airflow's database nor the broker
        stack_only = ("AIRFLOW__CELERY__", "AIRFLOW__DATABASE__")
        environ = {
            k: v for k, v in self.host_env(self.client).items() if not k.startswith(stack_only)
        }
        return subprocess.run(
            [sys.executable, "-m", "leukemia", "predict", *inputs, "--format", "json"],
            env=environ,
            cwd=self.client.root,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )


# --------------------------------------------------------------------------------------------
# the standard run: tiny synthetic smears, a 4-configuration grid
# --------------------------------------------------------------------------------------------


def tiny_conf(params: set[str], size: int = 48, shards: int = 2) -> dict[str, Any]:
    """The stack's DAG run: 2 optimizers x 2 batch sizes, a few epochs, no pretrained weights."""
    conf: dict[str, Any] = {
        "optimizers": ["adam", "rmsprop"],
        "batch_sizes": [8, 16],
        "variants": ["seed"],
        "epochs": 3,
        "input_size": size,
        "weights": "none",
        "precision": "float32",
    }
    if "extract_shards" in params:
        conf["extract_shards"] = shards
    if "heads" in params:  # one head keeps the grid at 4 trainings; 2-fold CV keeps it cheap
        conf["heads"] = ["mlp"]
    if "cv_folds" in params:
        conf["cv_folds"] = 2
    return conf


def summary_lines(result: RunResult) -> list[str]:
    """A table of the run's task instances: where each ran, its state and seconds."""
    lines = [
        f"run {result.run_id}: {result.state} in {result.wall_s:.0f} s",
        f"{'task':34} {'host':10} {'state':15} {'s':>6}",
    ]
    for t in sorted(result.tasks, key=lambda t: (t.start or datetime.max.astimezone(), t.label)):
        seconds = f"{t.seconds:.1f}" if t.seconds is not None else "-"
        lines.append(f"{t.label:34} {t.hostname or '-':10} {t.state or '-':15} {seconds:>6}")
    breaches = result.share_nothing_report()
    lines.append("share-nothing: " + ("kept" if not breaches else f"{len(breaches)} breaches"))
    lines += [f"  {b}" for b in breaches[:20]]
    return lines


def predictions(completed: subprocess.CompletedProcess) -> list[dict[str, Any]]:
    """The JSON list that `leukemia predict --format json` printed."""
    if completed.returncode != 0:
        raise StackError(f"predict exited {completed.returncode}:\n{completed.stderr[-3000:]}")
    return list(json.loads(completed.stdout))


@dataclass
class Session:
    """A stack in a folder with the images seeded: what the CLI, the test and the bench share."""

    stack: Stack
    images: int


@contextmanager
def open_session(
    root: Path,
    data: Path | None = None,
    per_class: int = 12,
    size: int = 48,
    **stack_options: Any,
) -> Iterator[Session]:
    """Start a stack, seed it with `data` (default: seeded synthetic smears) and yield it."""
    from leukemia.dev.synthetic import generate

    source = data
    if source is None:
        source = Path(root) / "source"
        generate(source, n_per_class=per_class, size=size, seed=7)
    stack = Stack(Path(root), **stack_options)
    with stack:
        images = stack.seed_images(source)
        yield Session(stack, images)


def main(argv: Sequence[str] | None = None) -> int:
    """Bring the stack up, run the training DAG once, print where each task ran, and stop it."""
    parser = argparse.ArgumentParser(prog="python -m leukemia.dev.stack", description=main.__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--data", type=Path, help="a <Class>/<name> image folder (default: synthetic)"
    )
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--conf", help="JSON merged into the run's conf")
    parser.add_argument(
        "--root", type=Path, help="folder for the stack (default: a new temp folder)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = args.root or Path(tempfile.mkdtemp(prefix="leukemia-stack-"))
    print(f"Stack folder: {root} (process logs in {root / 'logs'})", flush=True)
    with open_session(root, args.data, args.per_class, args.size, workers=args.workers) as session:
        stack = session.stack
        conf = {**tiny_conf(stack.dag_params(), args.size), **json.loads(args.conf or "{}")}
        print(f"{session.images} images; triggering {DAG_ID} with {json.dumps(conf)}", flush=True)
        result = stack.run(conf)
        print("\n".join(summary_lines(result)))
        if result.state != "success":
            print(stack.diagnosis(result))
            return 1
        first_class = f"s3://{stack.bucket}/{env('LEUKEMIA_RAW_PREFIX')}{CLASSES[0]}/"
        scored = stack.predict([first_class])
        print(
            f"predict in a fresh process: exit {scored.returncode}; {scored.stderr.strip()[-300:]}"
        )
        return 0 if scored.returncode == 0 and not result.share_nothing_report() else 1


if __name__ == "__main__":
    raise SystemExit(main())
