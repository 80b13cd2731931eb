"""Static checks of the production stack: docker-compose.yaml, .env.example and the Dockerfiles.

They need no Docker engine. The compose file is read the way Compose reads it (YAML with merge
keys, then `${VAR}` interpolation from .env.example) and validated against the Compose
Specification's JSON schema: tests/data/compose-spec.json is a verbatim copy of
schema/compose-spec.json from github.com/compose-spec/compose-spec (Apache-2.0).
When a `docker compose` or `docker-compose` binary is present, it parses the file as well.
"""

from __future__ import annotations

import base64
import configparser
import copy
import fnmatch
import inspect
import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
INSTALL_COMMAND = "pip install -r requirements.txt -c constraints.txt"

REQUIRED_SERVICES = {
    "preflight",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
    "postgres",
    "redis",
    "minio",
    "minio-init",
    "mlflow",
    "mlflow-init",
}
ONE_SHOT_SERVICES = {"preflight", "airflow-init", "minio-init", "mlflow-init"}
NON_AIRFLOW_SERVICES = {
    "preflight",
    "postgres",
    "redis",
    "minio",
    "minio-init",
    "mlflow",
    "mlflow-init",
}
AIRFLOW_MOUNTS = {
    "./dags": "/opt/airflow/dags",
    "./include": "/opt/airflow/include",
    "./plugins": "/opt/airflow/plugins",
    "./config": "/opt/airflow/config",
    "./logs": "/opt/airflow/logs",
}
PIPELINE_ENV = {
    "AIRFLOW_CONN_AWS_DEFAULT",
    "LEUKEMIA_BUCKET",
    "LEUKEMIA_RAW_PREFIX",
    "LEUKEMIA_AWS_CONN_ID",
    "LEUKEMIA_DATA_DIR",
    "LEUKEMIA_WEIGHTS",
    "LEUKEMIA_TRAINING_QUEUE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "LEUKEMIA_SCORING_MLFLOW_USERNAME",
    "LEUKEMIA_SCORING_MLFLOW_PASSWORD",
}

# `$$` (a literal dollar), `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`,
# `${NAME?error}` and `$NAME`, as in the Compose Specification's interpolation section.
TOKEN = re.compile(
    r"\$\$"
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


# --- reading the files the way Compose does --------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file; comments and blank lines skipped."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: line without '=': {line!r}"
            values[key.strip()] = value.strip()
    return values


def variables_in(text: str) -> set[str]:
    """Names of the variables that `text` interpolates (escaped `$$` excluded)."""
    names = set()
    for m in TOKEN.finditer(text):
        if m.group(0) != "$$":
            names.add(m.group("name") or m.group("bare"))
    return names


def interpolate(text: str, env: dict[str, str]) -> str:
    """Resolve `${VAR}` forms like Compose; a missing required variable raises ValueError."""

    def resolve(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ValueError(f"required variable {name} is missing: {arg}")
        return value or ""

    return TOKEN.sub(resolve, text)


def strings(node: Any) -> Iterator[str]:
    """Every string (keys and values) in a loaded YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def resolved(node: Any, env: dict[str, str]) -> Any:
    """A copy of `node` with every string value interpolated."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: resolved(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(item, env) for item in node]
    return node


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose() -> dict[str, Any]:
    """docker-compose.yaml as Compose sees it with .env copied from .env.example."""
    return resolved(raw_compose(), read_env_file(ENV_EXAMPLE))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target → source of a service's short-syntax volumes; an anonymous volume's source is ""."""
    out = {}
    for volume in service.get("volumes") or []:
        parts = str(volume).split(":")
        source, target = ("", parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        out[target] = source
    return out


def command_args(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def celery_queues(service: dict[str, Any]) -> list[str] | None:
    """Queues of a `celery worker` service (None when it is no Celery worker)."""
    args = command_args(service)
    if args[:2] != ["celery", "worker"]:
        return None
    for i, arg in enumerate(args):
        if arg in ("-q", "--queues"):
            return args[i + 1].split(",")
        if arg.startswith("--queues="):
            return arg.split("=", 1)[1].split(",")
    return ["default"]


def airflow_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    image = doc["x-airflow-common"]["image"]
    return {name: svc for name, svc in doc["services"].items() if svc.get("image") == image}


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host IP, host port, container port) of each published port; host IP "" = every interface.

    Short syntax `[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]` (IPv6 in brackets) or long syntax.
    """
    ports = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.append(
                (
                    str(entry.get("host_ip", "")),
                    str(entry.get("published", "")),
                    str(entry["target"]),
                )
            )
            continue
        text = str(entry).split("/", 1)[0]
        host_ip = ""
        if text.startswith("["):
            host_ip, _, text = text[1:].partition("]:")
        parts = text.split(":")
        if len(parts) == 3:
            host_ip, parts = parts[0], parts[1:]
        host_port, container_port = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
        ports.append((host_ip, host_port, container_port))
    return ports


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """The file of this repository that the service's bind mounts put at `container_path`."""
    for volume in service.get("volumes") or []:
        source, target = volume.split(":")[:2]
        if source.startswith("./") and (
            container_path == target or container_path.startswith(target.rstrip("/") + "/")
        ):
            return ROOT / source / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not bind-mounted from this repository")


def image_tag(reference: str) -> str | None:
    """The tag of an image reference (`registry:5000/repo/name:tag@sha256:...` -> `tag`)."""
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


def assert_pinned(reference: str, where: str) -> None:
    tag = image_tag(reference)
    assert tag, f"{where}: image {reference!r} has no tag; pin an explicit version"
    assert tag != "latest" and re.search(r"\d", tag), (
        f"{where}: image {reference!r} is not pinned to a version (tag {tag!r})"
    )


def pin(requirements: Path, package: str) -> str | None:
    """The `package==X` version in a requirements/constraints file, if the file pins it."""
    if not requirements.exists():
        return None
    pattern = re.compile(rf"^{re.escape(package)}(\[[^\]]*\])?==(?P<version>\S+)", re.I | re.M)
    m = pattern.search(requirements.read_text())
    return m.group("version") if m else None


def from_images(dockerfile: Path) -> list[str]:
    return re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", dockerfile.read_text(), re.M)


# --- (a) the file is valid Compose -----------------------------------------------------------


def schema_errors(doc: dict[str, Any]) -> list[str]:
    from jsonschema import Draft7Validator

    validator = Draft7Validator(json.loads(SCHEMA_FILE.read_text()))
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def test_compose_file_matches_the_compose_spec_schema() -> None:
    errors = schema_errors(compose())
    assert not errors, "docker-compose.yaml violates the Compose Specification:\n" + "\n".join(
        errors
    )


def test_schema_check_rejects_broken_files() -> None:
    """The schema really is strict: a misspelt key or an unknown condition is caught."""
    doc = compose()
    misspelt = copy.deepcopy(doc)
    misspelt["services"]["redis"]["healtcheck"] = misspelt["services"]["redis"].pop("healthcheck")
    bad_condition = copy.deepcopy(doc)
    bad_condition["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "healthy"
    for broken in (misspelt, bad_condition):
        assert schema_errors(broken)


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert (
        interpolate("${SET}-${EMPTY:-d}-${EMPTY-d}-${UNSET-d}-$$HOME-$SET", env) == "x-d--d-$HOME-x"
    )
    with pytest.raises(ValueError, match="EMPTY"):
        interpolate("${EMPTY:?set it}", env)
    assert variables_in("$${NOT_A_VAR} ${A:-1} ${B:?x y} $C") == {"A", "B", "C"}


# --- (b) pinned images -----------------------------------------------------------------------


def test_every_image_is_pinned_to_a_version() -> None:
    for name, service in compose()["services"].items():
        assert "image" in service, f"service {name} has no image: name and tag what it runs"
        assert_pinned(service["image"], f"service {name}")


def test_dockerfile_base_images_are_pinned() -> None:
    for dockerfile in (ROOT / "Dockerfile", ROOT / "docker" / "mlflow.Dockerfile"):
        images = from_images(dockerfile)
        assert images, f"{dockerfile.name} has no FROM line"
        for image in images:
            assert_pinned(image, dockerfile.name)


def test_image_versions_match_the_pinned_packages() -> None:
    """The Airflow and MLflow images run the versions requirements.txt pins."""
    airflow = pin(ROOT / "requirements.txt", "apache-airflow")
    mlflow = pin(ROOT / "requirements.txt", "mlflow")
    if airflow is None or mlflow is None:
        pytest.skip("requirements.txt does not pin apache-airflow and mlflow yet")
    (airflow_base,) = from_images(ROOT / "Dockerfile")
    assert image_tag(airflow_base) == f"{airflow}-python3.11"
    (mlflow_base,) = from_images(ROOT / "docker" / "mlflow.Dockerfile")
    assert image_tag(mlflow_base) == f"v{mlflow}"
    boto3 = pin(ROOT / "constraints.txt", "boto3")
    if boto3:
        assert f"boto3=={boto3}" in (ROOT / "docker" / "mlflow.Dockerfile").read_text()


def test_the_lock_holds_the_celery_executor_and_the_drivers_its_urls_name() -> None:
    """The stack's executor runs on the lock's packages, not on what the base image happens to have:
    the Celery provider, the Redis client, and the PostgreSQL drivers that the compose URLs name."""
    for package in ("apache-airflow-providers-celery", "redis", "psycopg2-binary", "asyncpg"):
        version = pin(ROOT / "requirements.txt", package)
        assert version, f"requirements.txt must pin {package} exactly"
        assert pin(ROOT / "constraints.txt", package) == version, f"constraints.txt: {package}"
    for package in ("celery", "kombu"):
        assert pin(ROOT / "constraints.txt", package), f"constraints.txt must lock {package}"
    env = environment(compose()["x-airflow-common"])
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which the lock does not hold
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")


# --- (c) variables and credentials -----------------------------------------------------------


def test_every_compose_variable_is_in_env_example() -> None:
    used = set().union(*(variables_in(s) for s in strings(raw_compose())))
    documented = set(read_env_file(ENV_EXAMPLE))
    assert used, "docker-compose.yaml interpolates no variable: the check would be vacuous"
    assert not used - documented, f"not in .env.example: {sorted(used - documented)}"
    assert not documented - used, f"in .env.example but unused: {sorted(documented - used)}"


def test_env_example_documents_each_variable() -> None:
    previous = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key = line.split("=", 1)[0]
            assert previous.startswith("#"), f".env.example: {key} has no comment above it"
        previous = line


def test_compose_resolves_with_env_example_and_fails_without_secrets() -> None:
    compose()  # every required variable is set in .env.example
    with pytest.raises(ValueError, match="required variable"):
        resolved(raw_compose(), {})


def test_no_real_credentials() -> None:
    secret_key = re.compile(r"PASSWORD|SECRET|FERNET", re.I)
    for key, value in read_env_file(ENV_EXAMPLE).items():
        if secret_key.search(key):
            assert value == "" or value.startswith("changeme"), (
                f".env.example: {key} must be empty or a changeme- placeholder"
            )
    doc = raw_compose()
    services = dict(doc["services"], **{"x-airflow-common": doc["x-airflow-common"]})
    for name, service in services.items():
        for key, value in environment(service).items():
            if secret_key.search(key) and not key.endswith("_FILE") and value:
                assert variables_in(value), f"{name}: {key} is hard-coded; read it from .env"
    for text in strings(doc):
        for password in re.findall(r"://[^:/@\s]*:([^@\s]*)@", text):
            assert not password or variables_in(password), f"hard-coded password in {text!r}"


# --- (d) one install command -----------------------------------------------------------------


def test_dockerfile_installs_with_the_project_install_command() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    run_lines = [line for line in dockerfile.splitlines() if line.startswith("RUN ")]
    assert any(INSTALL_COMMAND in line for line in run_lines), (
        f"the Dockerfile must RUN `{INSTALL_COMMAND}`"
    )
    copy_lines = " ".join(line for line in dockerfile.splitlines() if line.startswith("COPY "))
    assert "requirements.txt" in copy_lines and "constraints.txt" in copy_lines


def test_readme_shows_the_same_install_command() -> None:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet")
    assert INSTALL_COMMAND in readme.read_text()


# --- (e) services and start-up order ---------------------------------------------------------


def test_stack_has_the_required_services() -> None:
    services = compose()["services"]
    assert not REQUIRED_SERVICES - set(services), f"missing: {REQUIRED_SERVICES - set(services)}"
    commands = {name: command_args(services[name])[:2] for name in services}
    assert commands["airflow-apiserver"][:1] == ["api-server"]
    assert commands["airflow-scheduler"][:1] == ["scheduler"]
    assert commands["airflow-dag-processor"][:1] == ["dag-processor"]
    assert commands["airflow-triggerer"][:1] == ["triggerer"]
    assert commands["airflow-worker"] == ["celery", "worker"]
    assert ("127.0.0.1", "8080", "8080") in published_ports(services["airflow-apiserver"])
    assert "/api/v2/version" in " ".join(services["airflow-apiserver"]["healthcheck"]["test"])


def test_airflow_runs_on_celery_with_the_execution_api() -> None:
    doc = compose()
    env = environment(doc["x-airflow-common"])
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert (
        env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    )
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert "@postgres:" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"], "components must share one JWT secret"


def test_long_running_services_have_health_checks() -> None:
    for name, service in compose()["services"].items():
        if name in ONE_SHOT_SERVICES:
            assert service.get("restart") == "no", f"one-shot {name} must not restart"
            continue
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test != ["NONE"], f"service {name} has no health check"


def test_dependencies_exist_and_wait_for_readiness() -> None:
    doc = compose()
    services = doc["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions, not a list"
        for dep, spec in depends_on.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec.get("condition")
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health check"
            elif condition == "service_completed_successfully":
                assert dep in ONE_SHOT_SERVICES, f"{name} waits for {dep} to exit, but it runs on"
            else:
                pytest.fail(f"{name} -> {dep}: condition {condition!r}; wait for health or exit")
    for name in airflow_services(doc):
        deps = services[name]["depends_on"]
        assert {"postgres", "redis"} <= set(deps), f"{name} must wait for postgres and redis"
        if name != "airflow-init":
            assert deps["airflow-init"]["condition"] == "service_completed_successfully"
    for worker in ("airflow-worker", "airflow-worker-training"):
        assert services[worker]["depends_on"]["mlflow"]["condition"] == "service_healthy"
        # The workers log in to MLflow as users that mlflow-init creates.
        assert services[worker]["depends_on"]["mlflow-init"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == (
        "service_completed_successfully"
    )


def test_start_up_order_has_no_cycle() -> None:
    graph = {name: set(svc.get("depends_on") or {}) for name, svc in compose()["services"].items()}
    started: set[str] = set()
    while len(started) < len(graph):
        ready = {name for name, deps in graph.items() if name not in started and deps <= started}
        assert ready, f"dependency cycle among {sorted(set(graph) - started)}"
        started |= ready


def test_airflow_services_share_the_common_configuration() -> None:
    doc = compose()
    common_env = environment(doc["x-airflow-common"])
    services = airflow_services(doc)
    assert REQUIRED_SERVICES - NON_AIRFLOW_SERVICES <= set(services)
    for name, service in services.items():
        env = environment(service)
        assert {k: env.get(k) for k in common_env} == common_env, f"{name} lost common env"
        found = mounts(service)
        for source, target in AIRFLOW_MOUNTS.items():
            assert found.get(target) == source, f"{name} does not mount {source} at {target}"
    assert "/opt/airflow/include" in common_env["PYTHONPATH"].split(":")


def test_postgres_creates_the_mlflow_database() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    mounts = dict(v.split(":")[:2] for v in postgres["volumes"])
    init_dir = next(src for src, dst in mounts.items() if dst == "/docker-entrypoint-initdb.d")
    scripts = sorted((ROOT / init_dir).glob("*"))
    assert scripts, f"{init_dir} holds no init script"
    text = "\n".join(s.read_text() for s in scripts)
    assert "CREATE DATABASE" in text.upper()
    env = environment(postgres)
    for var in variables_in(text) - {"POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD"}:
        assert env.get(var), f"init script reads ${var}, which the postgres service does not set"
    backend = command_args(services["mlflow"])
    uri = backend[backend.index("--backend-store-uri") + 1]
    assert uri.startswith("postgresql://") and "@postgres:5432/" in uri
    assert uri.rsplit("/", 1)[1] == env["MLFLOW_DB_NAME"]
    for script in scripts:
        assert script.suffix in (".sql", ".sh", ".gz", ".xz", ".zst"), script.name


# --- the pipeline's settings, buckets and MLflow ---------------------------------------------


def test_pipeline_settings_are_set_for_airflow() -> None:
    doc = compose()
    env = environment(doc["x-airflow-common"])
    assert not PIPELINE_ENV - set(env), f"missing: {PIPELINE_ENV - set(env)}"
    conn = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
    assert conn["conn_type"] == "aws"
    assert conn["extra"]["endpoint_url"] == "http://minio:9000"
    assert conn["extra"]["region_name"]
    assert (
        env["LEUKEMIA_AWS_CONN_ID"] == "aws_default"
    )  # the connection AIRFLOW_CONN_AWS_DEFAULT defines
    assert (
        conn["login"] == env["AWS_ACCESS_KEY_ID"]
        and conn["password"] == env["AWS_SECRET_ACCESS_KEY"]
    )
    assert env["LEUKEMIA_RAW_PREFIX"].endswith("/")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # Workers share no disk: the local folder is each container's own anonymous volume (a cache),
    # and what tasks hand each other is in the image bucket's work prefix.
    for name in ("airflow-worker", "airflow-worker-training"):
        assert mounts(doc["services"][name])[env["LEUKEMIA_DATA_DIR"]] == "", name
    assert not any("data" in v for v in doc.get("volumes") or {} if v.startswith("leukemia"))
    work = environment(doc["services"]["minio-init"])["WORK_PREFIX"]
    assert env["LEUKEMIA_WORK_URI"] == f"s3://{env['LEUKEMIA_BUCKET']}/{work}"


def test_compose_stack_asks_a_person_before_a_model_goes_live() -> None:
    """The training DAG's require_approval Param defaults to this (off in the demo and tests)."""
    env = environment(compose()["x-airflow-common"])
    assert env["LEUKEMIA_REQUIRE_APPROVAL"] == "true"


def test_compose_sets_only_settings_the_library_knows() -> None:
    """A misspelt LEUKEMIA_* variable would silently fall back to the library's default."""
    config = pytest.importorskip("leukemia.config")
    known = getattr(config, "ENV_DEFAULTS", None)
    if not isinstance(known, dict):
        pytest.skip("leukemia.config has no ENV_DEFAULTS table")
    env = environment(compose()["x-airflow-common"])
    unknown = {k for k in env if k.startswith("LEUKEMIA_")} - set(known)
    assert not unknown, f"the library does not read {sorted(unknown)}"


def test_minio_init_creates_both_buckets(tmp_path: Path) -> None:
    doc = compose()
    services = doc["services"]
    init_env = environment(services["minio-init"])
    airflow_env = environment(doc["x-airflow-common"])
    assert init_env["IMAGE_BUCKET"] == airflow_env["LEUKEMIA_BUCKET"]
    assert init_env["RAW_PREFIX"] == airflow_env["LEUKEMIA_RAW_PREFIX"]
    args = command_args(services["mlflow"])
    destination = args[args.index("--artifacts-destination") + 1]
    assert destination == f"s3://{init_env['ARTIFACT_BUCKET']}/"
    calls = run_minio_init(doc, tmp_path).calls
    for bucket in (init_env["IMAGE_BUCKET"], init_env["ARTIFACT_BUCKET"]):
        assert ["mb", "--ignore-existing", f"local/{bucket}"] in calls, bucket
    assert init_env["S3_ACCESS_KEY"] == airflow_env["AWS_ACCESS_KEY_ID"]


def test_mlflow_server_serves_artifacts_and_accepts_its_host_names() -> None:
    services = compose()["services"]
    mlflow = services["mlflow"]
    args = command_args(mlflow)
    assert args[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in args
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "5000"
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    for host in ("mlflow:5000", "localhost:*"):
        assert host in allowed, f"MLflow would reject Host: {host}"
    assert environment(mlflow)["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    build = mlflow["build"]
    dockerfile = ROOT / build["context"] / build["dockerfile"]
    assert dockerfile.exists()
    text = dockerfile.read_text()
    assert re.search(r"psycopg2(-binary)?==\S+", text) and re.search(r"boto3==\S+", text)


# --- (f) the training queue ------------------------------------------------------------------


def test_training_queue_is_served() -> None:
    doc = compose()
    services = doc["services"]
    queue = environment(doc["x-airflow-common"])["LEUKEMIA_TRAINING_QUEUE"]
    assert queue == "training"
    for name, service in airflow_services(doc).items():
        assert environment(service)["LEUKEMIA_TRAINING_QUEUE"] == queue, name
    workers = {name: celery_queues(svc) for name, svc in services.items() if celery_queues(svc)}
    default_workers = {n: q for n, q in workers.items() if not services[n].get("profiles")}
    assert any(queue in q for q in default_workers.values()), "no worker serves the training queue"
    assert any("default" in q for q in default_workers.values()), "no worker serves `default`"
    assert workers.get("airflow-worker-training") == [queue]
    assert services["airflow-worker-training"]["profiles"] == ["gpu"]


# --- (g) security: secrets, published ports, MLflow logins, S3 policies ----------------------

SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET", re.I)
# Where each published port must be, and nothing else published.
EXPECTED_PORTS = {
    "minio": {"9000", "9001"},
    "airflow-apiserver": {"8080"},
    "flower": {"5555"},
    "mlflow": {"5000"},
}


def secret_variables() -> list[str]:
    """The .env.example variables that hold secrets."""
    return [key for key in read_env_file(ENV_EXAMPLE) if SECRET_NAME.search(key)]


def real_looking_env() -> dict[str, str]:
    """.env.example with every secret replaced as docs/production.md says."""
    from cryptography.fernet import Fernet

    values = read_env_file(ENV_EXAMPLE)
    values.update({key: secrets.token_hex(24) for key in secret_variables()})
    values["AIRFLOW_FERNET_KEY"] = Fernet.generate_key().decode()
    return values


def run_preflight(env_values: dict[str, str], shell: str = "sh") -> subprocess.CompletedProcess:
    """Run the preflight service's script as Compose would, with `env_values` as .env."""
    service = resolved(raw_compose(), env_values)["services"]["preflight"]
    shell_path, script = service["entrypoint"]
    assert shell_path == "/bin/sh", "preflight must run with the image's POSIX shell"
    return subprocess.run(
        [shell, str(host_path(service, script)), *command_args(service)],
        env={"PATH": os.environ["PATH"], **environment(service)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_rejected(result: subprocess.CompletedProcess, name: str, hint: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, f"preflight accepted a bad {name}: {result.stdout}"
    assert len(lines) == 1, f"preflight must say it in one line, said {lines}"
    assert name in lines[0] and hint in lines[0], lines[0]


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_preflight_accepts_real_looking_secrets(shell: str) -> None:
    result = run_preflight(real_looking_env(), shell)
    assert result.returncode == 0, result.stderr
    # The Fernet key recipe of docs/production.md works too.
    openssl_style = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    result = run_preflight({**real_looking_env(), "AIRFLOW_FERNET_KEY": openssl_style}, shell)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_preflight_rejects_each_changeme_placeholder(shell: str) -> None:
    example = read_env_file(ENV_EXAMPLE)
    placeholders = [key for key, value in example.items() if "changeme" in value]
    assert len(placeholders) >= 10, "the test would be vacuous"
    for name in placeholders:
        result = run_preflight({**real_looking_env(), name: example[name]}, shell)
        assert_rejected(result, name, "openssl rand -hex 24")
    # Wherever the word is, in any case.
    for value in ("CHANGEME-0123456789abcdef", "0123456789-ChangeMe-abcdef"):
        result = run_preflight({**real_looking_env(), "S3_SECRET_KEY": value}, shell)
        assert_rejected(result, "S3_SECRET_KEY", "placeholder")


def test_preflight_rejects_an_empty_or_malformed_fernet_key() -> None:
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    hint = "Fernet.generate_key().decode()"
    bad_keys = ("", "not-a-fernet-key", key[:-1], key[:-1] + "+", key.replace("=", "A"))
    for bad in (*bad_keys, f"{key},", f"{key},{key[:-1]}"):
        result = run_preflight({**real_looking_env(), "AIRFLOW_FERNET_KEY": bad})
        assert_rejected(result, "AIRFLOW_FERNET_KEY", hint)
    assert "empty" in run_preflight({**real_looking_env(), "AIRFLOW_FERNET_KEY": ""}).stderr
    # While rotating: `new,old` (docs/security.md).
    rotating = f"{Fernet.generate_key().decode()},{key}"
    result = run_preflight({**real_looking_env(), "AIRFLOW_FERNET_KEY": rotating})
    assert result.returncode == 0, result.stderr


def test_preflight_rejects_short_secrets() -> None:
    result = run_preflight({**real_looking_env(), "POSTGRES_PASSWORD": "hunter2"})
    assert_rejected(result, "POSTGRES_PASSWORD", "shorter than 16")


def test_preflight_checks_every_secret_of_env_example() -> None:
    service = compose()["services"]["preflight"]
    checked = command_args(service)
    missing = set(secret_variables()) - set(checked)
    assert not missing, f"preflight does not check {sorted(missing)}"
    raw_env = environment(raw_compose()["services"]["preflight"])
    for name in checked:
        assert variables_in(raw_env.get(name, "")) == {name}, (
            f"preflight checks {name} but its environment sets it to {raw_env.get(name)!r}"
        )


def test_every_service_starts_after_preflight() -> None:
    services = compose()["services"]
    graph = {name: set(svc.get("depends_on") or {}) for name, svc in services.items()}
    assert not graph["preflight"], "preflight must not wait for anything"
    for name in set(services) - {"preflight"}:
        reached, todo = set(), list(graph[name])
        while todo:
            dep = todo.pop()
            if dep not in reached:
                reached.add(dep)
                todo.extend(graph[dep])
        assert "preflight" in reached, f"{name} can start before preflight has checked .env"
    # Postgres and MinIO store their passwords when their volumes are created.
    for name in ("postgres", "minio", "redis", "airflow-init"):
        assert services[name]["depends_on"]["preflight"]["condition"] == (
            "service_completed_successfully"
        )


def test_published_ports_reads_every_syntax() -> None:
    """The port checks below see a port published on every interface."""
    service = {
        "ports": [
            "9000:9000",
            "5555",
            "127.0.0.1:8080:8080/tcp",
            "[::1]:5000:5000",
            {"target": 9001, "published": "9001"},
            {"target": 9002, "published": "9002", "host_ip": "127.0.0.1"},
        ]
    }
    assert published_ports(service) == [
        ("", "9000", "9000"),
        ("", "", "5555"),
        ("127.0.0.1", "8080", "8080"),
        ("::1", "5000", "5000"),
        ("", "9001", "9001"),
        ("127.0.0.1", "9002", "9002"),
    ]


def test_every_published_port_binds_to_localhost_by_default() -> None:
    example = read_env_file(ENV_EXAMPLE)
    assert example["LEUKEMIA_BIND_ADDRESS"] == "127.0.0.1"
    unset = {k: v for k, v in example.items() if k != "LEUKEMIA_BIND_ADDRESS"}
    for env_values in (example, unset):
        services = resolved(raw_compose(), env_values)["services"]
        published = {name: published_ports(svc) for name, svc in services.items()}
        published = {name: ports for name, ports in published.items() if ports}
        targets = {name: {port for _, _, port in ports} for name, ports in published.items()}
        assert targets == EXPECTED_PORTS
        for name, ports in published.items():
            for host_ip, host_port, port in ports:
                assert host_ip == "127.0.0.1", (
                    f"{name} publishes {port} on {host_ip or 'every interface'}"
                )
                assert host_port == port, f"{name}: {port} published as {host_port}"
    # The variable really moves them all.
    services = resolved(raw_compose(), {**example, "LEUKEMIA_BIND_ADDRESS": "0.0.0.0"})["services"]
    assert {ip for svc in services.values() for ip, _, _ in published_ports(svc)} == {"0.0.0.0"}


def test_flower_requires_a_login() -> None:
    flower = compose()["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    user, _, password = environment(flower)["AIRFLOW__CELERY__FLOWER_BASIC_AUTH"].partition(":")
    assert user and password == read_env_file(ENV_EXAMPLE)["FLOWER_PASSWORD"]
    assert "--user" in " ".join(flower["healthcheck"]["test"]), "the health check must log in"


def test_mlflow_server_command_uses_basic_auth() -> None:
    doc = compose()
    mlflow = doc["services"]["mlflow"]
    args = command_args(mlflow)
    assert args[:2] == ["mlflow", "server"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    env = environment(mlflow)
    config = configparser.ConfigParser()
    config.read_string(host_path(mlflow, env["MLFLOW_AUTH_CONFIG_PATH"]).read_text())
    auth = config["mlflow"]
    assert auth["default_permission"] in ("NO_PERMISSIONS", "READ")
    assert not auth.get("admin_password"), "no password in a committed file"
    # The user store outlives the container.
    database = auth["database_uri"]
    assert database.startswith("sqlite:////")
    folder = posixpath.dirname(database.removeprefix("sqlite:///"))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in mlflow["volumes"]}
    assert mounts.get(folder) in doc["volumes"], f"{folder} is not on a named volume"
    raw = environment(raw_compose()["services"]["mlflow"])
    assert variables_in(raw["MLFLOW_AUTH_ADMIN_PASSWORD"]) == {"MLFLOW_ADMIN_PASSWORD"}
    assert variables_in(raw["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == {"MLFLOW_FLASK_SECRET_KEY"}
    # The image has what the basic-auth app imports.
    flask_wtf = pin(ROOT / "constraints.txt", "Flask-WTF")
    assert flask_wtf, "constraints.txt must lock Flask-WTF (mlflow[auth])"
    dockerfile = (ROOT / mlflow["build"]["context"] / mlflow["build"]["dockerfile"]).read_text()
    assert f"Flask-WTF=={flask_wtf}" in dockerfile


def test_airflow_logs_in_to_mlflow_as_the_users_mlflow_init_creates() -> None:
    doc = compose()
    airflow = environment(doc["x-airflow-common"])
    init_service = doc["services"]["mlflow-init"]
    init = environment(init_service)
    server = environment(doc["services"]["mlflow"])
    assert init["MLFLOW_URL"] == airflow["MLFLOW_TRACKING_URI"]
    assert airflow["MLFLOW_TRACKING_USERNAME"] == init["MLFLOW_TRAINING_USERNAME"]
    assert airflow["MLFLOW_TRACKING_PASSWORD"] == init["MLFLOW_TRAINING_PASSWORD"]
    assert airflow["LEUKEMIA_SCORING_MLFLOW_USERNAME"] == init["MLFLOW_SCORING_USERNAME"]
    assert airflow["LEUKEMIA_SCORING_MLFLOW_PASSWORD"] == init["MLFLOW_SCORING_PASSWORD"]
    assert init["MLFLOW_ADMIN_USERNAME"] == server["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert init["MLFLOW_ADMIN_PASSWORD"] == server["MLFLOW_AUTH_ADMIN_PASSWORD"]
    users = {init[f"MLFLOW_{role}_USERNAME"] for role in ("ADMIN", "TRAINING", "SCORING")}
    assert len(users) == 3, "admin, training and scoring must be three users"
    assert init["MLFLOW_ADMIN_PASSWORD"] not in airflow.values(), "Airflow must not hold the admin"
    python, script = command_args(init_service)
    assert python == "python" and host_path(init_service, script).name == "setup_users.py"
    assert host_path(init_service, script).exists()


@dataclass
class MinioInit:
    """What one run of minio-init's script asked of `mc`."""

    calls: list[list[str]]
    policies: dict[str, dict[str, Any]]
    attached: dict[str, set[str]]
    returncode: int
    stderr: str


FAKE_MC = r"""#!/bin/sh
# Stands in for MinIO's `mc`: records each call, keeps the policy files it is given, and fails
# like mc does on `policy attach` of an attached policy and `policy detach` of a detached one.
set -eu
for arg in "$@"; do printf '%s\037' "$arg"; done >>"$FAKE_MC_DIR/calls"
echo >>"$FAKE_MC_DIR/calls"
case "$1 $2 ${3-}" in
    "admin policy create") cat "$6" >"$FAKE_MC_DIR/policy=$5" ;;
    "admin policy attach")
        [ -z "${FAKE_MC_BROKEN-}" ] || { echo "mc: <ERROR> policy not found" >&2; exit 1; }
        if [ -e "$FAKE_MC_DIR/attached=$7=$5" ]; then
            echo "mc: <ERROR> The specified policy change is already in effect." >&2
            exit 1
        fi
        : >"$FAKE_MC_DIR/attached=$7=$5"
        ;;
    "admin policy detach")
        [ -e "$FAKE_MC_DIR/attached=$7=$5" ] || { echo "mc: <ERROR> not attached" >&2; exit 1; }
        rm "$FAKE_MC_DIR/attached=$7=$5"
        ;;
esac
"""


def run_minio_init(
    doc: dict[str, Any],
    tmp_path: Path,
    shell: str = "sh",
    attached: tuple[tuple[str, str], ...] = (),
    broken: bool = False,
) -> MinioInit:
    """Run minio-init's script with a fake `mc`; `attached` = (user, policy) pairs that exist."""
    service = doc["services"]["minio-init"]
    shell_path, script = service["entrypoint"]
    assert shell_path == "/bin/sh"
    state = tmp_path / "mc"
    state.mkdir(parents=True, exist_ok=True)
    (state / "calls").write_text("")
    for user, policy in attached:
        (state / f"attached={user}={policy}").touch()
    fake = tmp_path / "bin" / "mc"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(FAKE_MC)
    fake.chmod(0o755)
    env = {
        **environment(service),
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "FAKE_MC_DIR": str(state),
        "RENDER_DIR": str(tmp_path),
        **({"FAKE_MC_BROKEN": "1"} if broken else {}),
    }
    result = subprocess.run(
        [shell, str(host_path(service, script))],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = [line.split("\x1f")[:-1] for line in (state / "calls").read_text().splitlines()]
    policies = {p.name.split("=", 1)[1]: json.loads(p.read_text()) for p in state.glob("policy=*")}
    links: dict[str, set[str]] = {}
    for p in state.glob("attached=*"):
        _, user, policy = p.name.split("=")
        links.setdefault(user, set()).add(policy)
    return MinioInit(calls, policies, links, result.returncode, result.stderr)


READ_ACTIONS = ("s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation")
WRITE_ACTIONS = (
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:DeleteObjectVersion",
    "s3:PutObjectTagging",
    "s3:DeleteObjectTagging",
    "s3:PutObjectRetention",
    "s3:PutObjectLegalHold",
    "s3:BypassGovernanceRetention",
    "s3:RestoreObject",
    "s3:ReplicateObject",
    "s3:ReplicateDelete",
    "s3:AbortMultipartUpload",
    "s3:CreateBucket",
    "s3:DeleteBucket",
    "s3:ForceDeleteBucket",
    "s3:PutBucketPolicy",
    "s3:DeleteBucketPolicy",
    "s3:PutBucketNotification",
    "s3:PutLifecycleConfiguration",
    "s3:PutBucketVersioning",
    "s3:PutBucketTagging",
    "s3:PutBucketObjectLockConfiguration",
    "s3:PutEncryptionConfiguration",
    "s3:PutReplicationConfiguration",
)
# Read-only actions that a policy may also name (multipart bookkeeping of its own uploads).
OTHER_READ_ACTIONS = ("s3:ListMultipartUploadParts", "s3:ListBucketMultipartUploads")


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def allows(policy: dict[str, Any], action: str, resource: str) -> bool:
    """Whether `policy` lets its user do `action` on `resource`, evaluated as IAM does: an explicit
    Deny wins, else any Allow. An Allow's conditions are ignored, so this errs towards finding
    too much access, never too little."""
    allowed = False
    for statement in policy["Statement"]:
        assert not {"NotAction", "NotResource"} & set(statement), "use Action and Resource"
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        hit = any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions) and any(
            fnmatch.fnmatchcase(resource, r) for r in resources
        )
        if hit and statement["Effect"] == "Deny" and "Condition" not in statement:
            return False
        allowed = allowed or (hit and statement["Effect"] == "Allow")
    return allowed


def probe_resources(env: dict[str, str]) -> list[str]:
    """Buckets and keys on both sides of every prefix boundary the policies draw."""
    images, artifacts = env["IMAGE_BUCKET"], env["ARTIFACT_BUCKET"]
    keys = ["a.jpg", "x/a.jpg"]
    for var in ("RAW_PREFIX", "INCOMING_PREFIX", "WORK_PREFIX", "PREDICTIONS_PREFIX"):
        prefix = env[var]
        keys += [f"{prefix}Benign/a.jpg", f"{prefix}a", f"{prefix.rstrip('/')}x/a", f"x/{prefix}a"]
    arns = [f"arn:aws:s3:::{bucket}" for bucket in (images, artifacts, "another-bucket")]
    arns += [f"arn:aws:s3:::{images}/{key}" for key in keys]
    arns += [
        f"arn:aws:s3:::{bucket}/{key}" for bucket in (artifacts, "another-bucket") for key in keys
    ]
    return arns


def assert_policy_limited(
    policy: dict[str, Any], env: dict[str, str], writable: dict[str, set[str]], who: str
) -> None:
    """No write action on any probed resource outside `writable` (ARN prefix -> actions)."""
    named = {action for st in policy["Statement"] for action in as_list(st["Action"])}
    unknown = named - set(READ_ACTIONS + WRITE_ACTIONS + OTHER_READ_ACTIONS)
    assert not unknown, f"{who}: review these actions and add them to the test: {sorted(unknown)}"
    for action in WRITE_ACTIONS:
        for arn in probe_resources(env):
            if allows(policy, action, arn):
                assert any(
                    arn.startswith(prefix) and action in actions
                    for prefix, actions in writable.items()
                ), f"{who} may {action} on {arn}"


def test_pipeline_s3_key_writes_nothing_outside_the_work_prefix(tmp_path: Path) -> None:
    doc = compose()
    env = environment(doc["services"]["minio-init"])
    run = run_minio_init(doc, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.attached[env["S3_ACCESS_KEY"]] == {"leukemia-pipeline"}
    policy = run.policies["leukemia-pipeline"]
    images = f"arn:aws:s3:::{env['IMAGE_BUCKET']}"
    write = {"s3:PutObject", "s3:AbortMultipartUpload"}
    assert_policy_limited(
        policy,
        env,
        {
            f"{images}/{env['WORK_PREFIX']}": write | {"s3:DeleteObject"},
            f"{images}/{env['PREDICTIONS_PREFIX']}": write,
        },
        "the pipeline's key",
    )
    # What the pipeline needs: read every image, write its scratch space and its predictions.
    assert allows(policy, "s3:ListBucket", images)
    assert allows(policy, "s3:GetObject", f"{images}/{env['RAW_PREFIX']}Benign/a.jpg")
    assert allows(policy, "s3:GetObject", f"{images}/{env['INCOMING_PREFIX']}a.jpg")
    assert allows(policy, "s3:PutObject", f"{images}/{env['WORK_PREFIX']}features/a.npy")
    assert allows(policy, "s3:PutObject", f"{images}/{env['PREDICTIONS_PREFIX']}ledger/v1.json")
    artifacts = f"arn:aws:s3:::{env['ARTIFACT_BUCKET']}"
    for action in READ_ACTIONS:
        for arn in (artifacts, f"{artifacts}/1/model/model.keras"):
            assert not allows(policy, action, arn), f"the pipeline's key may {action} {arn}"


def test_policy_prefixes_match_the_library() -> None:
    """The policies draw their lines where the pipeline really reads and writes."""
    scoring = pytest.importorskip("leukemia.scoring")
    env = environment(compose()["services"]["minio-init"])
    assert env["PREDICTIONS_PREFIX"] == scoring.PREDICTIONS_PREFIX
    incoming = inspect.signature(scoring.score_incoming).parameters["prefix"].default
    assert env["INCOMING_PREFIX"] == incoming
    assert env["WORK_PREFIX"] not in (env["RAW_PREFIX"], env["INCOMING_PREFIX"])


def test_mlflow_s3_key_reaches_only_the_artifact_bucket(tmp_path: Path) -> None:
    doc = compose()
    env = environment(doc["services"]["minio-init"])
    run = run_minio_init(doc, tmp_path)
    assert run.attached[env["MLFLOW_S3_ACCESS_KEY"]] == {"leukemia-mlflow"}
    server = environment(doc["services"]["mlflow"])
    assert server["AWS_ACCESS_KEY_ID"] == env["MLFLOW_S3_ACCESS_KEY"] != env["S3_ACCESS_KEY"]
    assert server["AWS_SECRET_ACCESS_KEY"] == env["MLFLOW_S3_SECRET_KEY"]
    policy = run.policies["leukemia-mlflow"]
    artifacts = f"arn:aws:s3:::{env['ARTIFACT_BUCKET']}/"
    assert_policy_limited(policy, env, {artifacts: set(WRITE_ACTIONS)}, "MLflow's key")
    for arn in probe_resources(env):
        if not arn.startswith(artifacts.rstrip("/")):
            for action in READ_ACTIONS:
                assert not allows(policy, action, arn), f"MLflow's key may {action} {arn}"
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert allows(policy, action, f"{artifacts}1/abc/artifacts/model.keras")


def test_uploader_s3_key_writes_only_new_images(tmp_path: Path) -> None:
    doc = compose()
    env = environment(doc["services"]["minio-init"])
    run = run_minio_init(doc, tmp_path)
    assert run.attached[env["S3_UPLOADER_ACCESS_KEY"]] == {"leukemia-uploader"}
    policy = run.policies["leukemia-uploader"]
    images = f"arn:aws:s3:::{env['IMAGE_BUCKET']}"
    write = {"s3:PutObject", "s3:AbortMultipartUpload"}
    assert_policy_limited(
        policy,
        env,
        {f"{images}/{env['RAW_PREFIX']}": write, f"{images}/{env['INCOMING_PREFIX']}": write},
        "the uploader's key",
    )
    assert allows(policy, "s3:PutObject", f"{images}/{env['RAW_PREFIX']}Benign/a.jpg")
    assert allows(policy, "s3:PutObject", f"{images}/{env['INCOMING_PREFIX']}a.jpg")


def test_policy_check_catches_a_broad_policy() -> None:
    """assert_policy_limited fails on a policy that writes outside its prefixes."""
    env = environment(compose()["services"]["minio-init"])
    images = f"arn:aws:s3:::{env['IMAGE_BUCKET']}"
    broad = {
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": [f"{images}/*"]},
        ]
    }
    with pytest.raises(AssertionError, match="may s3:PutObject"):
        assert_policy_limited(broad, env, {f"{images}/{env['WORK_PREFIX']}": {"s3:PutObject"}}, "x")
    wildcard = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    with pytest.raises(AssertionError, match="review these actions"):
        assert_policy_limited(wildcard, env, {}, "x")
    denied = {"Statement": [*broad["Statement"], {**broad["Statement"][0], "Effect": "Deny"}]}
    assert not allows(denied, "s3:PutObject", f"{images}/{env['RAW_PREFIX']}a.jpg")


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_minio_init_is_idempotent_and_drops_the_old_readwrite_policy(
    tmp_path: Path, shell: str
) -> None:
    doc = compose()
    env = environment(doc["services"]["minio-init"])
    pipeline = env["S3_ACCESS_KEY"]
    first = run_minio_init(doc, tmp_path, shell, attached=((pipeline, "readwrite"),))
    assert first.returncode == 0, first.stderr
    assert first.attached[pipeline] == {"leukemia-pipeline"}, "readwrite must be detached"
    again = run_minio_init(doc, tmp_path, shell)  # every policy is attached already
    assert again.returncode == 0, again.stderr
    assert again.attached == first.attached
    assert not any(
        call[:3] == ["admin", "policy", "attach"] and "readwrite" in call
        for call in first.calls + again.calls
    )
    broken = run_minio_init(doc, tmp_path / "broken", shell, broken=True)
    assert broken.returncode == 1
    assert "cannot attach policy leukemia-pipeline" in broken.stderr


def test_minio_init_refuses_a_prefix_without_a_slash(tmp_path: Path) -> None:
    doc = compose()
    doc["services"]["minio-init"]["environment"]["WORK_PREFIX"] = "work"
    run = run_minio_init(doc, tmp_path)
    assert run.returncode == 1 and "WORK_PREFIX" in run.stderr
    assert not run.calls, "nothing may be created before the settings are checked"


# --- a real Compose implementation, where one is installed -----------------------------------


def compose_binary() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env_file = tmp_path / ".env"
    shutil.copy(ENV_EXAMPLE, env_file)
    base = [*binary, "--project-directory", str(ROOT), "--env-file", str(env_file)]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    for profile_args in ([], ["--profile", "gpu", "--profile", "flower"]):
        result = subprocess.run(
            [*base, *profile_args, "-f", str(COMPOSE_FILE), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
            env=run_env,
        )
        assert result.returncode == 0, result.stderr
