"""The local stack's servers, one starter each: S3 (moto), PostgreSQL, Redis, MLflow and Airflow.

Each starter takes the stack's `Processes`, starts its server on 127.0.0.1 (a free port unless one
is given) and returns when it answers, or raises `StackError` with the server's log. Airflow's
settings come from the caller (`leukemia.dev.airflow_settings` says which are shared with
docker-compose.yaml). Development tooling, never imported by production code.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukemia.dev.airflow_rest import http
from leukemia.dev.processes import (
    START_TIMEOUT_S,
    Processes,
    StackError,
    as_user,
    free_port,
    venv_command,
)

ARTIFACT_BUCKET = "mlflow-artifacts"
#: The MLflow server's environment beyond the caller's, as in docker-compose.yaml: no job runner
#: (MLflow 3 starts five huey consumers for GenAI jobs by default; the pipeline runs none).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
DB_USER = "airflow"


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


# ---- binaries ---------------------------------------------------------------------------------


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


def db_url(password: str, port: int, database: str, driver: str = "postgresql+psycopg2") -> str:
    """A URL of one of the stack's PostgreSQL databases, as the stack's database role."""
    return f"{driver}://{DB_USER}:{password}@127.0.0.1:{port}/{database}"


# ---- S3 ---------------------------------------------------------------------------------------


def s3_keys() -> dict[str, str]:
    """AWS variables for the local S3 server (moto accepts any key; these are never real ones)."""
    from leukemia.dev.embedded import LOCAL_ACCESS_KEY, LOCAL_REGION, LOCAL_SECRET_KEY

    return {
        "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
        "AWS_DEFAULT_REGION": LOCAL_REGION,
    }


def s3_client(url: str) -> Any:
    """A boto3 client of the stack's S3 server (the harness's own; tasks use the connection)."""
    import boto3

    from leukemia.dev.embedded import LOCAL_ACCESS_KEY, LOCAL_REGION, LOCAL_SECRET_KEY

    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=LOCAL_ACCESS_KEY,
        aws_secret_access_key=LOCAL_SECRET_KEY,
        region_name=LOCAL_REGION,
    )


def start_s3(procs: Processes, environ: dict[str, str], cwd: Path, buckets: Sequence[str]) -> int:
    """moto's S3 server in a process of its own (its buckets live and die with it); its port."""
    port = free_port()
    cmd = [sys.executable, "-m", "leukemia", "s3-server", "--port", str(port)]
    server = procs.spawn("s3", cmd, environ, cwd, signal.SIGINT, database=True)
    url = f"http://127.0.0.1:{port}"
    procs.wait("the S3 server", lambda: http("GET", url)[0] == 200, [server], 60)
    client = s3_client(url)
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    return port


# ---- PostgreSQL and Redis ---------------------------------------------------------------------


def _initdb(binaries: Path, folder: Path, password: str, user: str | None) -> Path:
    """A new database cluster in `folder`/data whose role `DB_USER` has `password`."""
    password_file = folder / "password"
    password_file.write_text(password + "\n")
    if user:
        entry = pwd.getpwnam(user)
        for path in (folder, password_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    data = folder / "data"
    initdb = [str(binaries / "initdb"), "-D", str(data), "-U", DB_USER]
    initdb += [f"--pwfile={password_file}", "--auth=scram-sha-256", "--no-sync"]
    initdb += ["--encoding=UTF8", "--locale=C"]
    init = subprocess.run(
        initdb, env=_pg_env(folder), cwd=folder, capture_output=True, text=True, **as_user(user)
    )
    if init.returncode != 0:
        raise StackError(f"initdb failed:\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
    return data


def _pg_env(folder: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": str(folder)}


def start_postgres(procs: Processes, folder: Path, password: str, databases: Sequence[str]) -> int:
    """A throw-away PostgreSQL cluster in `folder` (reachable by its user) with `databases`."""
    import psycopg2

    binaries = postgres_bin()
    user = postgres_user()
    data = _initdb(binaries, folder, password, user)
    port = free_port()
    settings = {
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(folder),
        "max_connections": "200",
        # a throw-away cluster: durability buys nothing here
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    cmd = [str(binaries / "postgres"), "-D", str(data), "-p", str(port)]
    cmd += [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
    # SIGINT: PostgreSQL's fast shutdown (SIGTERM waits for every client to leave)
    server = procs.spawn(
        "postgres", cmd, _pg_env(folder), folder, signal.SIGINT, user=user, database=True
    )

    def connect() -> Any:
        return psycopg2.connect(
            host="127.0.0.1",
            port=port,
            user=DB_USER,
            password=password,
            dbname="postgres",
            connect_timeout=3,
        )

    procs.wait("PostgreSQL", lambda: connect().close() is None, [server], 60)
    db = connect()
    try:
        db.autocommit = True
        with db.cursor() as cur:
            for database in databases:
                cur.execute(f"CREATE DATABASE {database}")
    finally:
        db.close()
    return port


def start_redis(procs: Processes, folder: Path, password: str) -> int:
    """Redis behind `password`, nothing saved to disk: the Celery broker."""
    import redis

    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [redis_server(), "--bind", "127.0.0.1", "--port", str(port)]
    cmd += ["--requirepass", password, "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(folder), "--daemonize", "no"]
    server = procs.spawn("redis", cmd, {"PATH": os.environ.get("PATH", "")}, folder, database=True)
    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    procs.wait("Redis", lambda: bool(client.ping()), [server], 30)
    client.close()
    return port


# ---- MLflow and Airflow -----------------------------------------------------------------------


def start_mlflow(procs: Processes, environ: dict[str, str], backend_uri: str, cwd: Path) -> int:
    """An MLflow tracking server serving artifacts into the S3 artifact bucket; its port.

    Returns at once: `start_airflow` waits for it while it comes up.
    """
    port = free_port()
    cmd = [venv_command("mlflow"), "server", "--backend-store-uri", backend_uri]
    cmd += ["--serve-artifacts", "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    procs.spawn("mlflow", cmd, {**environ, **MLFLOW_SERVER_ENV}, cwd)
    return port


def start_airflow(
    procs: Processes,
    environ: dict[str, str],
    control: Path,
    api_port: int,
    workers: Sequence[Worker],
    worker_env: Callable[[Worker], dict[str, str]],
) -> None:
    """Migrate Airflow's database, then start api-server, scheduler, dag-processor and workers.

    `environ` holds the settings shared by every Airflow process plus the control host's home.
    """
    airflow = venv_command("airflow")
    migrate = subprocess.run(
        [airflow, "db", "migrate"], env=environ, cwd=control, capture_output=True, text=True
    )
    if migrate.returncode != 0:
        raise StackError(
            f"airflow db migrate failed:\n{migrate.stdout[-2000:]}{migrate.stderr[-3000:]}"
        )
    api = [airflow, "api-server", "--host", "127.0.0.1", "--port", str(api_port)]
    procs.spawn("api-server", [*api, "--workers", "1"], environ, control)
    procs.spawn("scheduler", [airflow, "scheduler"], environ, control)
    procs.spawn("dag-processor", [airflow, "dag-processor"], environ, control)
    for worker in workers:
        host_env = worker_env(worker)
        cmd = [airflow, "celery", "worker", "--celery-hostname", f"{worker.name}@stack"]
        cmd += ["--queues", f"default,{host_env['LEUKEMIA_TRAINING_QUEUE']}", "--concurrency", "1"]
        # task logs stay on the worker (the harness reads them from its folder); nothing
        # listens beyond loopback
        cmd += ["--skip-serve-logs", "--without-mingle", "--without-gossip"]
        if worker.cpu is not None:
            taskset = shutil.which("taskset")
            if not taskset:
                raise StackError("taskset not found: apt-get install util-linux")
            cmd = [taskset, "-c", str(worker.cpu), *cmd]
        procs.spawn(worker.name, cmd, host_env, worker.root)


def wait_for_mlflow(procs: Processes, url: str) -> None:
    """Until the MLflow server answers its health check (it takes a while to import)."""
    procs.wait(
        "MLflow",
        lambda: http("GET", f"{url}/health")[0] == 200,
        procs.named("mlflow"),
        START_TIMEOUT_S,
    )
