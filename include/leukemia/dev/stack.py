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
This module composes the stack from its parts: `processes` (starting and stopping server
processes), `services` (one starter per server), `airflow_settings` (the Airflow settings shared
with docker-compose.yaml), `airflow_rest` (the REST client) and `sharenothing` (the checks of a
finished run). Development tooling (the multi-worker test, `bench/scale.py`), never imported by production code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES, env, project_root
from leukemia.dev.airflow_rest import DAG_ID, AirflowClient, TaskRecord
from leukemia.dev.airflow_settings import admin_user, shared_settings
from leukemia.dev.demo import DEMO_POLICY
from leukemia.dev.processes import (
    START_TIMEOUT_S,
    Processes,
    Service,
    StackError,
    base_env,
    free_port,
)
from leukemia.dev.services import (
    ARTIFACT_BUCKET,
    Worker,
    db_url,
    postgres_bin,
    postgres_user,
    redis_server,
    s3_client,
    s3_keys,
    start_airflow,
    start_mlflow,
    start_postgres,
    start_redis,
    start_s3,
    wait_for_mlflow,
)
from leukemia.dev.sharenothing import (
    RunResult,
    ShareNothingViolation,
    fence_hits,
    xcom_local_paths,
)

__all__ = [
    "ARTIFACT_BUCKET",
    "DAG_ID",
    "RunResult",
    "ShareNothingViolation",
    "Stack",
    "StackError",
    "TaskRecord",
    "Worker",
    "main",
    "open_session",
    "postgres_bin",
    "postgres_user",
    "predictions",
    "redis_server",
    "summary_lines",
    "tiny_conf",
]

log = logging.getLogger(__name__)


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
        self.processes = Processes(self.root / "logs")
        self.shared = shared_settings()  # what docker-compose.yaml's Airflow settings say
        self._pg_dir: Path | None = None
        self._rest: AirflowClient | None = None
        self._previous_sigterm: Any = None
        self._secrets = {
            k: secrets.token_urlsafe(24) for k in ("db", "redis", "admin", "jwt", "api")
        }
        self.ports: dict[str, int] = {}

    # ---- addresses -------------------------------------------------------------------------

    @property
    def services(self) -> list[Service]:
        return self.processes.services

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
        return db_url(self._secrets["db"], self.ports["postgres"], database, driver)

    @property
    def rest(self) -> AirflowClient:
        """The REST API v2 client, logged in as the admin user."""
        if self._rest is None:
            user = admin_user(self.shared)
            self._rest = AirflowClient(self.api_url, user, self._secrets["admin"])
        return self._rest

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Stack:
        """Start every server, wait until each answers, and the DAG is parsed and workers ready."""
        control = self.root / "control"
        for folder in (self.root / "logs", control, self.client.root):
            folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self._stop_on_sigterm()
        try:
            s3_env = {**base_env(), "PYTHONPATH": str(project_root() / "include")}
            buckets = (self.bucket, ARTIFACT_BUCKET)
            self.ports["s3"] = start_s3(self.processes, s3_env, control, buckets)
            self._pg_dir = Path(tempfile.mkdtemp(prefix="leukemia-stack-pg-"))  # for its user
            databases = ("airflow", "mlflow")
            self.ports["postgres"] = start_postgres(
                self.processes, self._pg_dir, self._secrets["db"], databases
            )
            self.ports["redis"] = start_redis(
                self.processes, control / "redis", self._secrets["redis"]
            )
            mlflow_env = {
                **base_env(),
                "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
                **s3_keys(),
                "HOME": str(control),
            }
            self.ports["mlflow"] = start_mlflow(
                self.processes, mlflow_env, self._db_url("mlflow"), control
            )
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
        self.processes.stop()
        if self._pg_dir is not None:
            shutil.rmtree(self._pg_dir, ignore_errors=True)
            self._pg_dir = None
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    # ---- Airflow's settings ------------------------------------------------------------------

    def airflow_env(self) -> dict[str, str]:
        """Settings every Airflow process shares: docker-compose.yaml's, plus the local ones."""
        from cryptography.fernet import Fernet

        from leukemia.dev.embedded import aws_connection_json

        if "fernet" not in self._secrets:
            self._secrets["fernet"] = Fernet.generate_key().decode()
        root = project_root()
        local = {  # what must differ on one machine: addresses, paths, secrets, tuning
            "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
            "AIRFLOW__CORE__FERNET_KEY": self._secrets["fernet"],
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
            # the DAG files do not change while the stack runs: parse each once, not every 30 s
            # (each pass over the five files costs about 3 s of CPU that the tasks need)
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_AWS_DEFAULT": aws_connection_json(self.s3_url),
            **s3_keys(),
            "LEUKEMIA_BUCKET": self.bucket,
            "LEUKEMIA_TRAINING_SLOTS": str(self.training_slots),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PYTHONPATH": str(root / "include"),
            # a tiny model: the gate only reports and nobody is asked; policy, as in production,
            # comes from the deployment's environment, never from the run's conf
            **DEMO_POLICY,
        }
        return {**base_env(), **self.shared, **local, **self.extra_env}

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

    # ---- Airflow's processes -----------------------------------------------------------------

    def _start_airflow(self) -> None:
        self.ports["api"] = free_port()
        control = self.root / "control"
        passwords = {admin_user(self.shared): self._secrets["admin"]}
        (control / "passwords.json").write_text(json.dumps(passwords))
        environ = {
            **self.airflow_env(),
            "AIRFLOW_HOME": str(control / "airflow"),
            "HOME": str(control),
        }
        (control / "airflow").mkdir(exist_ok=True)
        wait_for_mlflow(self.processes, self.mlflow_url)
        start_airflow(
            self.processes, environ, control, self.ports["api"], self.workers, self.host_env
        )

    def _wait_ready(self) -> None:
        watch = list(self.services)
        wait = self.processes.wait
        wait("the API server", self.rest.healthy, watch, START_TIMEOUT_S)
        wait(
            f"the DAG {DAG_ID} to be parsed",
            lambda: self.rest.api("GET", f"/dags/{DAG_ID}")[0] == 200,
            watch,
            START_TIMEOUT_S,
        )
        wait("every Celery worker to answer a ping", self._workers_answer, watch, START_TIMEOUT_S)
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
        return self.rest.api(method, path, body)

    def dag_params(self, dag_id: str = DAG_ID) -> set[str]:
        """Names of the Params the served DAG accepts."""
        return self.rest.dag_params(dag_id)

    def s3_client(self) -> Any:
        """A boto3 client of the stack's S3 server (the harness's own; tasks use the connection)."""
        return s3_client(self.s3_url)

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

    def fence_hits(self) -> list[dict[str, str]]:
        """Every attempt of a worker (or the client) to reach a folder that is not its own."""
        return fence_hits(host.fence_log for host in [*self.workers, self.client])

    def xcom_local_paths(self, run_id: str, dag_id: str = DAG_ID) -> list[str]:
        """`task[map]: key = path` for each XCom of the run that names a file in the stack's folders."""
        return xcom_local_paths(self.rest.xcoms(run_id, dag_id), self.root)

    def run(
        self,
        conf: dict[str, Any],
        timeout_s: float = 900.0,
        stop_at_first_breach: bool = False,
        dag_id: str = DAG_ID,
    ) -> RunResult:
        """Trigger one run and wait for it to finish (or for the first breach of share-nothing)."""
        started = time.monotonic()
        run_id = self.rest.trigger(conf, dag_id)
        deadline = started + timeout_s
        state = "queued"
        while time.monotonic() < deadline:
            self.processes.check_alive("the run")
            state = self.rest.run_state(run_id, dag_id) or state
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
            self.rest.task_instances(run_id, dag_id),
            time.monotonic() - started,
            self.fence_hits(),
            self.xcom_local_paths(run_id, dag_id),
        )

    def task_errors(self, record: TaskRecord) -> list[str]:
        """The errors in a task instance's latest log, read from whichever worker's folder holds it."""
        from leukemia.dev.diagnosis import task_log_errors

        index = "" if record.map_index < 0 else f"map_index={record.map_index}/"
        pattern = f"logs/**/task_id={record.task_id}/{index}attempt=*.log"
        logs = sorted(
            (p for w in self.workers for p in w.airflow_home.glob(pattern)),
            key=lambda p: p.stat().st_mtime,
        )
        if not logs:
            return [f"no log of {record.label} in the workers' folders"]
        return [*task_log_errors(logs[-1].read_text(errors="replace")), f"(log: {logs[-1]})"]

    def diagnosis(self, result: RunResult) -> str:
        """The account of a run that did not succeed (`diagnosis.failure_report`, as the demo
        prints it): each failed task with where it ran and the errors of its log."""
        from leukemia.dev.diagnosis import FailedTask, failure_report

        failed = [
            FailedTask(t.label, self.task_errors(t), f"{t.hostname} ({t.state})")
            for t in result.tasks
            if t.state in ("failed", "up_for_retry")
        ]
        blocked = [t.label for t in result.tasks if t.state == "upstream_failed"]
        hint = f"Task logs: logs/ in the workers' folders under {self.root}"
        return "\n".join(
            failure_report(DAG_ID, result.run_id, failed, blocked, hint, str(result.state))
        )

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
