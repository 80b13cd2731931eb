"""The compose stack's MLflow logins, against a real `mlflow server --app-name basic-auth`.

The server runs with the compose file's own command line (backend, artifact folder, host and
port swapped for local ones), docker/mlflow/basic_auth.ini (user store moved to tmp) and the
users that docker/mlflow/setup_users.py (the mlflow-init job) makes.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_compose import command_args, compose

from leukemia.dev.services import MLFLOW_SERVER_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
AUTH_INI = ROOT / "docker" / "mlflow" / "basic_auth.ini"
SETUP_USERS = ROOT / "docker" / "mlflow" / "setup_users.py"
MODEL = "leukemia-classifier"
EXPERIMENT = "leukemia-vgg16"
START_TIMEOUT_S = 120


@dataclass(frozen=True)
class AuthServer:
    url: str
    logins: dict[str, tuple[str, str]]  # role -> (username, password)
    log: Path

    def setup_env(self, **overrides: str) -> dict[str, str]:
        """The mlflow-init job's environment for this server."""
        env = {"PATH": os.environ["PATH"], "MLFLOW_URL": self.url, "MLFLOW_WAIT_S": "10"}
        for role, (username, password) in self.logins.items():
            env[f"MLFLOW_{role.upper()}_USERNAME"] = username
            env[f"MLFLOW_{role.upper()}_PASSWORD"] = password
        return {**env, **overrides}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(tmp: Path, port: int) -> list[str]:
    """The compose file's `mlflow server` command with local stores, host and port.

    The compose file gives the backend store (and its password) in the environment,
    MLFLOW_BACKEND_STORE_URI, which `mlflow server` reads like its flag; the fixture's environment
    holds no MLFLOW_* variable, so the local SQLite store is passed as the flag here.
    """
    from test_compose import environment

    service = compose()["services"]["mlflow"]
    args = command_args(service)
    assert args[:2] == ["mlflow", "server"]
    assert "--backend-store-uri" not in args, "the database password would show in `ps`"
    assert environment(service)["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    local = {
        "--artifacts-destination": str(tmp / "artifacts"),
        "--host": "127.0.0.1",
        "--port": str(port),
    }
    for flag, value in local.items():
        args[args.index(flag) + 1] = value
    mlflow = Path(sys.executable).with_name("mlflow")
    backend = ["--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    return [str(mlflow), *args[1:], *backend, "--workers", "1"]


def run_setup(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SETUP_USERS)], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """A basic-auth MLflow server on 127.0.0.1 with the pipeline's users set up."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    config = configparser.ConfigParser()
    config.read_string(AUTH_INI.read_text())
    config["mlflow"]["database_uri"] = f"sqlite:///{tmp / 'basic_auth.db'}"
    with (tmp / "basic_auth.ini").open("w") as fh:
        config.write(fh)
    logins = {
        "admin": ("admin", "admin-password-0123456789"),
        "training": ("leukemia-training", "training-password-0123456789"),
        "scoring": ("leukemia-scoring", "scoring-password-0123456789"),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        **MLFLOW_SERVER_ENV,
        MLFLOW_AUTH_CONFIG_PATH=str(tmp / "basic_auth.ini"),
        MLFLOW_AUTH_ADMIN_USERNAME=logins["admin"][0],
        MLFLOW_AUTH_ADMIN_PASSWORD=logins["admin"][1],
        MLFLOW_FLASK_SERVER_SECRET_KEY="test-flask-secret-0123456789",
    )
    port = free_port()
    log = tmp / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            server_command(tmp, port),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the server forks uvicorn: stop the whole group
        )
    server = AuthServer(f"http://127.0.0.1:{port}", logins, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while status("GET", f"{server.url}/health") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        result = run_setup(server.setup_env())
        assert result.returncode == 0, result.stderr
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def status(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    login: tuple[str, str] | None = None,
) -> int | None:
    """HTTP status of one request (None when nothing answers)."""
    headers = {"Content-Type": "application/json"}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.fixture()
def login_as(
    auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], Any]]:
    """Point MLflow's client at the server, logged in as a role."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(auth_server.url)

    def login(role: str) -> Any:
        """An MlflowClient; the login is MLflow's environment variables, read per request."""
        username, password = auth_server.logins[role]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        return mlflow.MlflowClient()

    yield login
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def champion(auth_server: AuthServer) -> dict[str, str]:
    """A run and a registered version with @champion, made by the training user."""
    import mlflow
    from mlflow.exceptions import MlflowException

    username, password = auth_server.logins["training"]
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=username, MLFLOW_TRACKING_PASSWORD=password)
    try:
        mlflow.set_tracking_uri(auth_server.url)
        client = mlflow.MlflowClient()
        experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_metric("val_macro_f1", 0.9)
            mlflow.log_text("weights", "model/model.keras")
        # mlflow-init created the model as the training user: creating it again is refused
        with pytest.raises(MlflowException, match="RESOURCE_ALREADY_EXISTS|already exists"):
            client.create_registered_model(MODEL)
        version = client.create_model_version(
            MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
        ).version
        client.set_registered_model_alias(MODEL, "champion", version)
        return {"experiment_id": experiment_id, "run_id": run.info.run_id, "version": version}
    finally:
        mlflow.set_tracking_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_requests(champion: dict[str, str]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """The registry and tracking writes that would let someone swap the champion."""
    return {
        "create a run": (
            "POST",
            "/api/2.0/mlflow/runs/create",
            {"experiment_id": champion["experiment_id"]},
        ),
        "register a model": ("POST", "/api/2.0/mlflow/registered-models/create", {"name": "evil"}),
        "add a version": (
            "POST",
            "/api/2.0/mlflow/model-versions/create",
            {"name": MODEL, "source": f"runs:/{champion['run_id']}/model"},
        ),
        "set @champion": (
            "POST",
            "/api/2.0/mlflow/registered-models/alias",
            {"name": MODEL, "alias": "champion", "version": champion["version"]},
        ),
    }


def test_without_credentials_nobody_can_write_or_read(
    auth_server: AuthServer, champion: dict[str, str]
) -> None:
    url = auth_server.url
    wrong = (auth_server.logins["training"][0], "wrong-password-0123456789")
    for what, (method, path, body) in write_requests(champion).items():
        assert status(method, url + path, body) == 401, f"anyone may {what}"
        assert status(method, url + path, body, wrong) == 401, f"a wrong password may {what}"
    alias = f"{url}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion"
    assert status("GET", alias) == 401, "anyone may read the champion"
    assert status("GET", f"{url}/health") == 200, "the health check needs no login"


def test_training_user_can_track_register_and_promote(
    login_as, champion: dict[str, str], auth_server: AuthServer
) -> None:
    client = login_as("training")
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion["version"]
    run = client.create_run(champion["experiment_id"])
    version = client.create_model_version(
        MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    ).version
    client.set_registered_model_alias(MODEL, "challenger", version)
    client.set_model_version_tag(MODEL, version, "selection", "test")
    assert client.get_model_version_by_alias(MODEL, "challenger").version == version
    # The admin may too, over plain HTTP with the same request an anonymous caller was refused.
    admin = auth_server.logins["admin"]
    method, path, body = write_requests(champion)["set @champion"]
    assert status(method, auth_server.url + path, body, admin) == 200


def test_scoring_user_reads_the_champion_but_cannot_change_anything(
    login_as, champion: dict[str, str], tmp_path: Path, auth_server: AuthServer
) -> None:
    import mlflow

    client = login_as("scoring")
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion["version"]
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path))
    assert (Path(local) / "model.keras").read_text() == "weights"
    scoring = auth_server.logins["scoring"]
    for what, (method, path, body) in write_requests(champion).items():
        if what == "register a model":
            # MLflow lets every user create models of its own (no grant can forbid it without
            # also hiding the pipeline's model); the pipeline loads only LEUKEMIA_MODEL_NAME,
            # owned by the training user (test_init_job_makes_the_training_user_own_...)
            continue
        code = status(method, auth_server.url + path, body, scoring)
        assert code == 403, f"the scoring user may {what} (HTTP {code})"


def test_scoring_tasks_log_in_as_the_scoring_user(
    login_as, champion: dict[str, str], monkeypatch: pytest.MonkeyPatch, auth_server: AuthServer
) -> None:
    """The compose stack's Airflow login is the training user; scoring switches to its own."""
    from mlflow.exceptions import MlflowException

    from leukemia.config import scoring_mlflow_login

    client = login_as("training")
    username, password = auth_server.logins["scoring"]
    monkeypatch.setenv("LEUKEMIA_SCORING_MLFLOW_USERNAME", username)
    monkeypatch.setenv("LEUKEMIA_SCORING_MLFLOW_PASSWORD", password)
    with scoring_mlflow_login():
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == username
        assert client.get_model_version_by_alias(MODEL, "champion").version
        with pytest.raises(MlflowException, match="403"):
            client.set_registered_model_alias(MODEL, "champion", champion["version"])
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == auth_server.logins["training"][0]
    client.set_registered_model_alias(MODEL, "champion", champion["version"])


def test_a_user_without_grants_sees_nothing(
    auth_server: AuthServer, champion: dict[str, str]
) -> None:
    """default_permission in docker/mlflow/basic_auth.ini: a new user gets no access."""
    admin = auth_server.logins["admin"]
    nobody = ("nobody", "nobody-password-0123456789")
    body = {"username": nobody[0], "password": nobody[1]}
    assert status("POST", f"{auth_server.url}/api/2.0/mlflow/users/create", body, admin) == 200
    url = auth_server.url
    experiment = f"{url}/api/2.0/mlflow/experiments/get?experiment_id={champion['experiment_id']}"
    assert status("GET", experiment, login=nobody) == 403
    alias = f"{url}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion"
    assert status("GET", alias, login=nobody) == 403


def test_setup_users_is_idempotent_and_says_what_to_fix(auth_server: AuthServer) -> None:
    url = f"{auth_server.url}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion"
    training = auth_server.logins["training"]
    rotated = "rotated-password-0123456789"
    result = run_setup(auth_server.setup_env(MLFLOW_TRAINING_PASSWORD=rotated))
    assert result.returncode == 0, result.stderr
    assert "password updated" in result.stdout
    assert status("GET", url, login=training) == 401, "the old password still works"
    assert status("GET", url, login=(training[0], rotated)) == 200
    result = run_setup(auth_server.setup_env())  # back to the fixture's password
    assert result.returncode == 0, result.stderr
    assert status("GET", url, login=training) == 200
    result = run_setup(auth_server.setup_env(MLFLOW_ADMIN_PASSWORD="not-the-admin-password"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MLFLOW_ADMIN_PASSWORD" in lines[0], lines
    same = auth_server.setup_env(MLFLOW_SCORING_USERNAME=training[0])
    result = run_setup(same)
    assert result.returncode == 1 and "three different users" in result.stderr


def test_init_job_makes_the_training_user_own_the_pipelines_experiment_and_model(
    auth_server: AuthServer,
) -> None:
    """Issue 22 #1: on a fresh server the scoring user could create the model first and own it.

    A fresh deployment is a model name nobody created yet: the init job creates it, owned by the
    training user, before the scoring user can."""
    url, scoring = auth_server.url, auth_server.logins["scoring"]
    admin, fresh = auth_server.logins["admin"], "fresh-classifier"
    result = run_setup(
        auth_server.setup_env(LEUKEMIA_MODEL_NAME=fresh, LEUKEMIA_EXPERIMENT="fresh")
    )
    assert result.returncode == 0, result.stderr
    assert f"registered model {fresh} created" in result.stdout
    for login, expected in ((scoring, "READ"), (auth_server.logins["training"], "MANAGE")):
        query = urllib.parse.urlencode(
            {"username": login[0], "resource_type": "registered_model", "resource_id": fresh}
        )
        got = get_json(f"{url}/api/3.0/mlflow/users/permissions/get?{query}", admin)
        assert got["permission"] == expected, (login[0], got)
    takeovers = {
        "create the pipeline's model": (
            "POST",
            "/api/2.0/mlflow/registered-models/create",
            {"name": fresh},
        ),
        "tag the pipeline's model": (
            "POST",
            "/api/2.0/mlflow/registered-models/set-tag",
            {"name": fresh, "key": "owner", "value": "scoring"},
        ),
        "add a version from a path": (
            "POST",
            "/api/2.0/mlflow/model-versions/create",
            {"name": fresh, "source": "/tmp/evil"},
        ),
    }
    for what, (method, path, body) in takeovers.items():
        code = status(method, url + path, body, scoring)
        assert code in (400, 403), f"the scoring user may {what} (HTTP {code})"
    # idempotent: a second run keeps the owner and the grants, and says so
    result = run_setup(
        auth_server.setup_env(LEUKEMIA_MODEL_NAME=fresh, LEUKEMIA_EXPERIMENT="fresh")
    )
    assert result.returncode == 0, result.stderr
    assert f"registered model {fresh} exists" in result.stdout


def test_scoring_login_cannot_move_champion_through_the_registry(
    login_as, champion: dict[str, str], auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack of issue 22 #1 through the project's own code: refused at the server."""
    from leukemia import registry

    login_as("scoring")
    monkeypatch.setenv("LEUKEMIA_MODEL_NAME", MODEL)
    with pytest.raises(registry.ModelError):
        registry.move_champion(champion["version"], "rollback", "take over", "scoring", "test")
    with pytest.raises(Exception, match="403|PERMISSION_DENIED"):
        registry.client().set_model_version_tag(MODEL, champion["version"], "gate", "passed")


def get_json(url: str, login: tuple[str, str]) -> dict[str, Any]:
    """The JSON body of one authenticated GET."""
    token = base64.b64encode(":".join(login).encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read().decode())
