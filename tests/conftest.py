"""Shared fixtures: a moto S3 server on loopback, the Airflow connection to it, synthetic images."""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Airflow reads its configuration when first imported: give the test session its own SQLite home.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="leukemia-airflow-"))
from leukemia.dev.embedded import S3Server, airflow_home_env, aws_connection_json  # noqa: E402

os.environ.update({**airflow_home_env(_AIRFLOW_HOME, ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"})
for _name in ("MLFLOW_TRACKING_URI", "LEUKEMIA_DATA_DIR", "LEUKEMIA_WEIGHTS"):
    os.environ.pop(_name, None)  # a developer's settings must not leak into the tests


#: Test files that mostly wait on servers and subprocesses: collected first, so that pytest-xdist
#: (`--dist loadfile` hands files out in collection order) starts them while the other workers
#: train, instead of leaving one worker on them alone at the end.
#: test_approval.py must not run after test_dags.py in one worker: there its approval task never
#: waited for an answer and the reviewer timed out (seen once on 2026-12-03, not yet explained).
FIRST = ("test_stack.py", "test_demo.py", "test_approval.py", "test_dags.py")


#: Then the files that take longest on a worker (about 45 to 145 s each, `make test` in a fresh
#: clone on 2 cores, 2026-12-03), longest first, so that the short files fill the end and the three
#: workers finish together; the rest follow in collection order.
LONG = (
    "test_registry.py",
    "test_finetune.py",
    "test_gate.py",
    "test_backends.py",
    "test_audit.py",
    "test_training.py",
    "test_tracking.py",
    "test_features.py",
    "test_ensemble.py",
    "test_scoring.py",
)


def _order(item: pytest.Item) -> tuple[int, int]:
    """Where a test's file goes: FIRST, then LONG in its order, then the rest."""
    name = item.path.name
    if name in FIRST:
        return 0, 0
    return 1, LONG.index(name) if name in LONG else len(LONG)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the files in FIRST at the front, then those in LONG; the sort keeps each file's order."""
    items.sort(key=_order)


def _waits(scope: str) -> bool:
    """Whether a pytest-xdist work unit (a test file's path, `--dist loadfile`) is in FIRST."""
    return Path(scope.split("::", 1)[0]).name in FIRST


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` that never queues a FIRST file behind another on one worker.

    A worker only starts its last pending test once it has been sent more work (it must know the
    next test), so pytest-xdist sends each worker a second file early: behind test_approval.py
    (one test) that was test_stack.py, and the two waited in series while other workers idled.
    Here a worker still busy with a FIRST file is sent the next other file instead.
    """
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class WaitingFilesApart(LoadFileScheduling):  # type: ignore[misc]
        def _assign_work_unit(self, node: Any) -> None:
            busy = any(
                _waits(scope) and not all(unit.values())
                for scope, unit in self.assigned_work.get(node, {}).items()
            )
            scopes = list(self.workqueue)
            pick = next((s for s in scopes if not (busy and _waits(s))), scopes[0])
            self.workqueue.move_to_end(pick, last=False)
            super()._assign_work_unit(node)

    return WaitingFilesApart(config, log)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the whole session; tests use their own buckets."""
    with S3Server() as server:
        yield server


@pytest.fixture()
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point Airflow's `aws_default` connection at the local server."""
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", aws_connection_json(s3_server.endpoint_url))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret-key")
    s3_server.requests.reset()
    return s3_server


@pytest.fixture()
def bucket(aws_env: S3Server) -> str:
    """A fresh, empty bucket on the local server."""
    from leukemia.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client("aws_default").create_bucket(Bucket=name)
    aws_env.requests.reset()
    return name


@pytest.fixture(scope="session")
def smear_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic data set: 6 images of 48 px per class."""
    from leukemia.dev.synthetic import generate

    out = tmp_path_factory.mktemp("smears")
    generate(out, n_per_class=6, size=48, seed=1)
    return out


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """An initialised Airflow metadata database (SQLite) for DAG runs."""
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, env=os.environ)
    return _AIRFLOW_HOME


@functools.cache
def _empty_mlflow_store() -> Path:
    """An MLflow SQLite store with its tables created and nothing in them, made once per process.

    MLflow creates a new store's tables by running its schema migrations, about 1.5 s of CPU each
    time: a test's store starts as a copy of this one instead (0.05 s), the same file MLflow would
    have made.
    """
    import mlflow

    folder = Path(tempfile.mkdtemp(prefix="leukemia-mlflow-template-"))
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def new_mlflow_store(folder: Path) -> str:
    """A new, empty MLflow store at `folder`/mlflow.db (a copy of `_empty_mlflow_store`); its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_empty_mlflow_store(), folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture()
def mlflow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh local MLflow store and data folder for one test."""
    monkeypatch.setenv("LEUKEMIA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_mlflow_store(tmp_path))
    return tmp_path


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """No internet (every proxy on a closed local port), an empty home, no weights configured.

    Applied to this process and returned as the environment for a subprocess (a demo run).
    """
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed when the block ends
    home = tmp_path / "home"
    home.mkdir()
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.setenv("HOME", str(home))
    for name in ("KERAS_HOME", "NO_PROXY", "no_proxy", "MPLCONFIGDIR", "LEUKEMIA_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LEUKEMIA_", "AIRFLOW"))}
    environ.pop("MLFLOW_TRACKING_URI", None)
    environ["PYTHONPATH"] = str(ROOT / "include")
    yield environ
    # urllib keeps the opener (with these proxies) it built on first use: later tests need a new one
    urllib.request.install_opener(None)


def quick_train_config(size: int, optimizer: str = "adam") -> Any:
    """A `TrainConfig` for tests that need a registered model but not how it was selected: two
    epochs, no cross-validation, no augmented copies, no base weights."""
    from leukemia.model import ModelConfig
    from leukemia.training import TrainConfig

    return TrainConfig(
        optimizer=optimizer,
        batch_size=8,
        epochs=2,
        cv_folds=1,
        augment_copies=0,
        model=ModelConfig(size, "none"),
    )


@contextmanager
def store_at(workdir: Path) -> Iterator[Path]:
    """MLflow's store and LEUKEMIA_DATA_DIR in `workdir` for the block (as `mlflow_env` does for
    a test): a module fixture trains there once, and each test gets a copy (`clone_workdir`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEUKEMIA_DATA_DIR", str(workdir / "data"))
        exists = (workdir / "mlflow.db").exists()
        uri = f"sqlite:///{workdir / 'mlflow.db'}" if exists else new_mlflow_store(workdir)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield workdir


def clone_workdir(source: Path, target: Path) -> None:
    """Copy a trained work folder (MLflow SQLite store and artifacts, split, features) to `target`
    with every absolute path the store records rewritten, so that a test can write to its copy
    (new runs, changed artifacts) without touching the trained state other tests read."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    old, new = str(source), str(target)
    with sqlite3.connect(target / "mlflow.db") as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in db.execute(f"PRAGMA table_info('{table}')").fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT", "STRING")):
                    name = column[1]
                    db.execute(
                        f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                        f'WHERE instr("{name}", ?) > 0',
                        (old, new, old),
                    )
    db.close()
    # MLflow keeps each run's artifact repository by run id: the copy's runs have the same ids
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._artifact_repos_cache.clear()
