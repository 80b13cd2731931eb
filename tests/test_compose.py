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
import importlib.util
import inspect
import json
import os
import posixpath
import pwd
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
INSTALL_COMMAND = "pip install -r requirements.txt -c constraints.txt"

REQUIRED_SERVICES = {
    "preflight",
    "volume-init",
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
ONE_SHOT_SERVICES = {"preflight", "volume-init", "airflow-init", "minio-init", "mlflow-init"}
NON_AIRFLOW_SERVICES = {
    "preflight",
    "volume-init",
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
    """Target → source of a service's volumes (short or long syntax); an anonymous volume's
    source is ""."""
    out = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            out[volume["target"]] = volume.get("source", "")
            continue
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
    for target, source in mounts(service).items():
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


def postgres_init_scripts(postgres: dict[str, Any]) -> list[Path]:
    init_dir = mounts(postgres)["/docker-entrypoint-initdb.d"]
    scripts = sorted((ROOT / init_dir).glob("*"))
    assert scripts, f"{init_dir} holds no init script"
    return scripts


def test_postgres_creates_the_airflow_and_mlflow_databases() -> None:
    doc = compose()
    postgres = doc["services"]["postgres"]
    scripts = postgres_init_scripts(postgres)
    text = "\n".join(s.read_text() for s in scripts)
    assert "CREATE DATABASE" in text.upper()
    env = environment(postgres)
    read = {name for name in variables_in(text) if name.isupper()}  # lower case: the script's own
    for var in read - {"POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD"}:
        assert env.get(var), f"init script reads ${var}, which the postgres service does not set"
    uri = environment(doc["services"]["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("postgresql://") and "@postgres:5432/" in uri
    assert uri.rsplit("/", 1)[1] == env["MLFLOW_DB_NAME"]
    airflow = environment(doc["x-airflow-common"])["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert airflow.rsplit("/", 1)[1] == env["AIRFLOW_DB_NAME"]
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


def test_compose_stack_sets_the_promotion_policy_and_the_training_login_for_every_worker() -> None:
    """Policy (the gate, a person's approval) and whose versions load are deployment settings."""
    env = environment(compose()["x-airflow-common"])
    assert env["LEUKEMIA_REQUIRE_APPROVAL"] == "true"  # not a ${...}: .env cannot switch it off
    assert (env["LEUKEMIA_MIN_F1_MACRO"], env["LEUKEMIA_MIN_MALIGNANT_SENSITIVITY"]) == (
        "0.9",
        "0.99",
    )  # the documented defaults, from .env where set
    assert env["LEUKEMIA_TRAINING_MLFLOW_USERNAME"] == env["MLFLOW_TRACKING_USERNAME"]
    init = environment(compose()["services"]["mlflow-init"])
    assert init["LEUKEMIA_MODEL_NAME"] == env["LEUKEMIA_MODEL_NAME"]
    assert init["LEUKEMIA_EXPERIMENT"] == env["LEUKEMIA_EXPERIMENT"]


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
    # the same server settings as the embedded stack's: no GenAI job runner
    from leukemia.dev.services import MLFLOW_SERVER_ENV

    assert {k: environment(mlflow).get(k) for k in MLFLOW_SERVER_ENV} == MLFLOW_SERVER_ENV
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
    check = " ".join(flower["healthcheck"]["test"])
    # The health check logs in, with the login on curl's stdin (`-K -`), not in its arguments.
    assert "user = " in check and "-K -" in check and "--user" not in check


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
    assert mounts(mlflow).get(folder) in doc["volumes"], f"{folder} is not on a named volume"
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


# --- (h) exposures: command lines, who holds which secret, generated passwords, root ----------

NEW_SECRETS = ("AIRFLOW_ADMIN_PASSWORD", "AIRFLOW_DB_PASSWORD", "REDIS_PASSWORD")


def holders(doc: dict[str, Any], variable: str) -> set[str]:
    """The services whose environment interpolates `variable` (the raw compose file)."""
    return {
        name
        for name, service in doc["services"].items()
        if any(variable in variables_in(value) for value in environment(service).values())
    }


def service_user(service: dict[str, Any]) -> str | None:
    """Whom a service runs as: its `user`, else the last USER of the Dockerfile it is built from;
    None when neither says (the image's own user, root for minio and mlflow upstream)."""
    if service.get("user"):
        return str(service["user"])
    build = service.get("build")
    if isinstance(build, dict):
        dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.M)
        return users[-1] if users else None
    return None


def test_no_secret_is_interpolated_into_a_command_line() -> None:
    """`ps` on the host lists every container's processes with their arguments, and `docker
    inspect` their commands: a secret reaches a process through its environment or stdin."""
    doc = raw_compose()
    secret_names = set(secret_variables())
    services = dict(doc["services"], **{"x-airflow-common": doc["x-airflow-common"]})
    for name, service in services.items():
        for key in ("command", "entrypoint", "healthcheck"):
            for text in strings(service.get(key)):
                leaked = variables_in(text) & secret_names
                assert not leaked, f"{name}'s {key} puts {sorted(leaked)} on a command line"


def test_mlflow_reads_its_database_password_from_the_environment() -> None:
    mlflow = compose()["services"]["mlflow"]
    assert "--backend-store-uri" not in command_args(mlflow)
    uri = urlsplit(environment(mlflow)["MLFLOW_BACKEND_STORE_URI"])
    example = read_env_file(ENV_EXAMPLE)
    assert (uri.username, uri.password) == (
        example["MLFLOW_DB_USER"],
        example["MLFLOW_DB_PASSWORD"],
    )
    cli = pytest.importorskip("mlflow.cli")
    option = next(p for p in cli.server.params if p.name == "backend_store_uri")
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI", "mlflow server no longer reads it there"


def test_airflow_containers_hold_only_the_airflow_database_role() -> None:
    """The superuser could write MLflow's database (runs, registry, @champion): it stays in the
    postgres container; Airflow logs in as a role that owns the airflow database only."""
    raw = raw_compose()
    others = {"POSTGRES_USER", "POSTGRES_PASSWORD", "MLFLOW_DB_USER", "MLFLOW_DB_PASSWORD"}
    for name, service in airflow_services(raw).items():
        for key, value in environment(service).items():
            held = variables_in(value) & others
            assert not held, (
                f"{name}: {key} holds {sorted(held)}; Airflow logs in as AIRFLOW_DB_USER"
            )
    assert holders(raw, "POSTGRES_PASSWORD") == {"postgres", "preflight"}
    assert holders(raw, "MLFLOW_DB_PASSWORD") == {"postgres", "preflight", "mlflow"}
    doc = compose()
    postgres = environment(doc["services"]["postgres"])
    airflow = environment(doc["x-airflow-common"])
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
        url = urlsplit(airflow[key])
        assert (url.username, url.password, url.path) == (
            postgres["AIRFLOW_DB_USER"],
            postgres["AIRFLOW_DB_PASSWORD"],
            "/" + postgres["AIRFLOW_DB_NAME"],
        ), key
    mlflow = urlsplit(environment(doc["services"]["mlflow"])["MLFLOW_BACKEND_STORE_URI"])
    assert mlflow.username == postgres["MLFLOW_DB_USER"]
    roles = {postgres["POSTGRES_USER"], postgres["AIRFLOW_DB_USER"], postgres["MLFLOW_DB_USER"]}
    assert len(roles) == 3, "the superuser, Airflow and MLflow need three roles"
    script = "\n".join(s.read_text() for s in postgres_init_scripts(doc["services"]["postgres"]))
    assert "NOSUPERUSER" in script and "REVOKE ALL ON DATABASE" in script


@pytest.mark.slow
def test_postgres_init_gives_each_database_a_role_of_its_own() -> None:
    """docker/postgres-init/ on a real PostgreSQL: each role owns its database, may create tables
    there, is no superuser and cannot connect to the other database; a second run changes nothing."""
    import psycopg2

    stack = pytest.importorskip("leukemia.dev.stack")
    try:
        binaries, user = stack.postgres_bin(), stack.postgres_user()
    except stack.StackError as exc:
        pytest.skip(str(exc))
    if not (binaries / "pg_ctl").is_file() or not shutil.which("psql"):
        pytest.skip("pg_ctl or psql not found")
    doc = resolved(raw_compose(), real_looking_env())
    postgres = doc["services"]["postgres"]
    env = environment(postgres)
    folder = Path(tempfile.mkdtemp(prefix="leukemia-pg-init-"))  # reachable by `user`
    as_user: dict[str, Any] = {}
    if user:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        as_user = {"user": user, "group": user, "extra_groups": []}
    port = stack.free_port()
    run_env = {
        "PATH": f"{binaries}:{os.environ['PATH']}",
        "LC_ALL": "C",
        "HOME": str(folder),
        "PGHOST": str(folder),
        "PGPORT": str(port),
    }

    def run(*cmd: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd,
            env={**run_env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=folder,
            **as_user,
        )

    data = str(folder / "data")
    init = run(
        "initdb",
        "-D",
        data,
        "-U",
        env["POSTGRES_USER"],
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "--no-sync",
    )
    assert init.returncode == 0, init.stderr
    options = f"-k {folder} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = run("pg_ctl", "-D", data, "-o", options, "-l", str(folder / "log"), "-w", "start")
    assert started.returncode == 0, started.stderr
    try:
        # Twice: the scripts are idempotent (an upgrade, a changed password).
        for script in 2 * [s for s in postgres_init_scripts(postgres) if s.suffix == ".sh"]:
            done = run("bash", str(script), extra=env)
            assert done.returncode == 0, done.stderr

        def connect(role: str, database: str) -> Any:
            return psycopg2.connect(
                host="127.0.0.1",
                port=port,
                dbname=database,
                connect_timeout=5,
                user=env[f"{role}_DB_USER"],
                password=env[f"{role}_DB_PASSWORD"],
            )

        for role, other in (("AIRFLOW", "MLFLOW"), ("MLFLOW", "AIRFLOW")):
            db = connect(role, env[f"{role}_DB_NAME"])
            try:
                with db, db.cursor() as cur:
                    cur.execute("CREATE TABLE probe (id serial PRIMARY KEY)")
                    cur.execute(
                        "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                        "WHERE rolname = current_user"
                    )
                    assert cur.fetchone() == (False, False, False), role
            finally:
                db.close()
            with pytest.raises(psycopg2.OperationalError, match="CONNECT"):
                connect(role, env[f"{other}_DB_NAME"])
    finally:
        run("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_redis_requires_the_password_that_the_broker_url_carries() -> None:
    doc = compose()
    redis = doc["services"]["redis"]
    password = read_env_file(ENV_EXAMPLE)["REDIS_PASSWORD"]
    assert environment(redis)["REDIS_PASSWORD"] == password
    script = " ".join([*redis["entrypoint"], *command_args(redis)])
    assert "requirepass $REDIS_PASSWORD" in script, "the password must reach redis-server"
    assert "redis-server -" in script and "--requirepass" not in script, "on stdin, not argv"
    broker = urlsplit(environment(doc["x-airflow-common"])["AIRFLOW__CELERY__BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.password) == ("redis", "redis", password)
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"]), "the check must log in"
    assert holders(raw_compose(), "REDIS_PASSWORD") == {"redis", "preflight"} | set(
        airflow_services(raw_compose())
    )


@pytest.mark.slow
def test_redis_starts_with_the_password_off_its_command_line() -> None:
    """The redis service's own command and health check, run with a local redis-server."""
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    password = secrets.token_hex(24)
    redis = resolved(raw_compose(), {**real_looking_env(), "REDIS_PASSWORD": password})
    redis = redis["services"]["redis"]
    shell, flag, script = [*redis["entrypoint"], *command_args(redis)]
    assert (shell, flag) == ("/bin/sh", "-c")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    local = f"redis-server --port {port} --bind 127.0.0.1 --save '' -"
    env = {"PATH": os.environ["PATH"], **environment(redis)}
    server = subprocess.Popen(
        [shell, flag, script.replace("redis-server -", local)],
        env=env,
        cwd=tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    check = redis["healthcheck"]["test"][1].replace("redis-cli", f"redis-cli -p {port}")
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["/bin/sh", "-c", check], env=env, timeout=10).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.2)
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert cmdline.startswith("redis-server") and password not in cmdline
        anonymous = subprocess.run(
            ["redis-cli", "-p", str(port), "set", "k", "v"], capture_output=True, text=True
        )
        assert "NOAUTH" in anonymous.stdout + anonymous.stderr
        wrong = subprocess.run(["/bin/sh", "-c", check], env={**env, "REDIS_PASSWORD": "x" * 16})
        assert wrong.returncode != 0, "the health check passes without the password"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_minio_and_mlflow_run_as_users_that_own_their_volumes() -> None:
    doc = compose()
    services = doc["services"]
    init = services["volume-init"]
    assert service_user(init) == "0:0", "volume-init must run as root to hand volumes over"
    args = command_args(init)
    assert len(args) % 2 == 0, "volume-init takes FOLDER UID:GID pairs"
    handed = dict(zip(args[::2], args[1::2], strict=True))
    init_mounts = mounts(init)
    for name in ("minio", "mlflow", "mlflow-init", "redis"):
        user = service_user(services[name])
        assert user and user.split(":")[0] not in ("0", "root"), f"{name} runs as root"
    for name in ("minio", "mlflow"):
        service = services[name]
        user = service_user(service)
        assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user or ""), f"{name}: give a numeric UID:GID"
        assert service["depends_on"]["volume-init"]["condition"] == "service_completed_successfully"
        for volume in service["volumes"]:
            if isinstance(volume, str):
                assert volume.split(":")[0] not in doc["volumes"], (
                    f"{name}: mount {volume} with nocopy (long syntax): on an empty volume Docker "
                    "copies the image folder's owner over volume-init's"
                )
                continue
            if volume["type"] != "volume":
                continue
            assert volume.get("volume", {}).get("nocopy") is True, f"{name}: {volume['target']}"
            folder = next((t for t, s in init_mounts.items() if s == volume["source"]), None)
            assert folder, f"volume-init does not mount {volume['source']}"
            assert handed.get(folder) == user, f"volume-init gives {folder} to another user"


def run_own_volumes(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """volume-init's script with a `chown` that records its arguments instead."""
    service = compose()["services"]["volume-init"]
    shell, script = service["entrypoint"]
    fake = tmp_path / "bin" / "chown"
    fake.parent.mkdir(exist_ok=True)
    record = tmp_path / "chown-calls"
    record.write_text("")
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >>"{record}"\n')
    fake.chmod(0o755)
    result = subprocess.run(
        [shell, str(host_path(service, script)), *args],
        env={"PATH": f"{fake.parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, record.read_text().splitlines()


def test_volume_init_hands_over_only_what_another_user_owns(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    (volume / "bucket").mkdir(parents=True)
    (volume / "bucket" / "object").write_text("x")
    mine = f"{os.getuid()}:{os.getgid()}"
    other = f"{os.getuid() + 1}:{os.getgid() + 1}"
    result, calls = run_own_volumes(tmp_path, str(volume), other)
    assert result.returncode == 0, result.stderr
    assert calls[:2] == ["-h", other]
    assert set(calls[2:]) == {
        str(volume),
        str(volume / "bucket"),
        str(volume / "bucket" / "object"),
    }
    assert stat.S_IMODE(volume.stat().st_mode) == 0o700, "other users must not read the volume"
    if os.getuid() != 0:
        result, calls = run_own_volumes(tmp_path, str(volume), mine)
        assert result.returncode == 0 and calls == [], "files that are right stay untouched"
    for bad in ("0:0", "10001", "root:root"):
        result, calls = run_own_volumes(tmp_path, str(volume), bad)
        assert result.returncode == 1 and not calls, bad
        assert len(result.stderr.strip().splitlines()) == 1


def run_passwords_script(
    tmp_path: Path, env_values: dict[str, str], extra: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, Path, dict[str, str]]:
    """The api-server's entrypoint with its compose environment, the passwords file in tmp_path,
    and a stand-in for Airflow that says whether it sees a password variable."""
    api = resolved(raw_compose(), env_values)["services"]["airflow-apiserver"]
    script = host_path(api, api["entrypoint"][3])
    target = tmp_path / "run" / "passwords.json"
    env = {
        **environment(api),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(target),
        "PATH": os.environ["PATH"],
        **(extra or {}),
    }
    probe = (
        "import os; print('airflow starts', sorted(k for k in os.environ"
        " if k == 'AIRFLOW_ADMIN_PASSWORD' or k.startswith('AIRFLOW_PASSWORD_')))"
    )
    result = subprocess.run(
        [sys.executable, str(script), sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, target, env


def test_airflow_admin_password_comes_from_env_and_stays_out_of_config() -> None:
    """Airflow's simple auth manager generates a missing user's password, prints it to the log
    and keeps it in plain text in its passwords file: the api-server supplies the file instead,
    from .env, on a tmpfs of its own rather than in the bind-mounted ./config."""
    doc = compose()
    api = doc["services"]["airflow-apiserver"]
    env = environment(api)
    target = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    for name, service in airflow_services(doc).items():
        for folder, source in mounts(service).items():
            inside = target == folder or target.startswith(folder.rstrip("/") + "/")
            assert not inside, f"{name} puts the passwords file on {source or 'a volume'}"
    tmpfs = api.get("tmpfs") or []
    tmpfs = [tmpfs] if isinstance(tmpfs, str) else tmpfs
    assert any(target.startswith(t.split(":")[0].rstrip("/") + "/") for t in tmpfs), (
        f"{target} is not on the api-server's tmpfs"
    )
    entrypoint = api["entrypoint"]
    assert entrypoint[:3] == ["/usr/bin/dumb-init", "--", "python"]
    assert host_path(api, entrypoint[3]).name == "passwords.py"
    assert entrypoint[4:] == ["/entrypoint"] and command_args(api) == ["api-server"]
    users = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    assert users == f"{env['AIRFLOW_ADMIN_USERNAME']}:admin"
    raw = raw_compose()
    raw_api = environment(raw["services"]["airflow-apiserver"])
    assert variables_in(raw_api["AIRFLOW_ADMIN_PASSWORD"]) == {"AIRFLOW_ADMIN_PASSWORD"}
    assert holders(raw, "AIRFLOW_ADMIN_PASSWORD") == {"airflow-apiserver", "preflight"}


def test_api_server_writes_the_passwords_file_that_airflow_reads_without_printing(
    tmp_path: Path,
) -> None:
    env_values = real_looking_env()
    password = env_values["AIRFLOW_ADMIN_PASSWORD"]
    result, target, env = run_passwords_script(tmp_path, env_values)
    assert result.returncode == 0, result.stderr
    assert "airflow starts []" in result.stdout, "Airflow must start without the password variables"
    assert password not in result.stdout + result.stderr
    assert json.loads(target.read_text()) == {env_values["AIRFLOW_ADMIN_USERNAME"]: password}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    if importlib.util.find_spec("airflow") is None:
        pytest.skip("Airflow is not installed")
    # Airflow's own auth manager on that file: it takes the password and prints none. Then, as a
    # control, on a missing file: it generates one and prints it (what the file prevents).
    probe = textwrap.dedent(
        """
        import json, os
        from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
        SimpleAuthManager().init()
        print("PASSWORDS", json.dumps(SimpleAuthManager.get_passwords()), flush=True)
        os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = "MISSING"
        SimpleAuthManager().init()
        """
    )
    keep = ("AIRFLOW__CORE__AUTH_MANAGER", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS")
    airflow_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(target),
        **{key: env[key] for key in keep},
    }
    before = target.read_text()
    run = subprocess.run(
        [sys.executable, "-c", probe.replace("MISSING", str(tmp_path / "generated.json"))],
        env=airflow_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ours, _, control = run.stdout.partition("PASSWORDS")
    passwords_line = control.splitlines()[0]
    assert json.loads(passwords_line) == {env_values["AIRFLOW_ADMIN_USERNAME"]: password}
    assert "Password for user" not in ours + passwords_line and password not in run.stderr
    assert target.read_text() == before, "Airflow rewrote the passwords file"
    assert "Password for user" in control, "the control run should print a generated password"


def test_api_server_refuses_a_user_without_a_password(tmp_path: Path) -> None:
    env_values = real_looking_env()
    users = f"{env_values['AIRFLOW_ADMIN_USERNAME']}:admin,jane.doe:viewer"
    extra = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users}
    result, target, _ = run_passwords_script(tmp_path, env_values, extra)
    assert result.returncode == 1 and "airflow starts" not in result.stdout
    assert "AIRFLOW_PASSWORD_JANE_DOE" in result.stderr and not target.exists()
    for bad, hint in (("changeme-jane-doe-password", "placeholder"), ("short", "shorter than")):
        result, target, _ = run_passwords_script(
            tmp_path, env_values, {**extra, "AIRFLOW_PASSWORD_JANE_DOE": bad}
        )
        assert result.returncode == 1 and hint in result.stderr, result.stderr
    jane = secrets.token_hex(24)
    result, target, _ = run_passwords_script(
        tmp_path, env_values, {**extra, "AIRFLOW_PASSWORD_JANE_DOE": jane}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(target.read_text())["jane.doe"] == jane


@pytest.mark.parametrize("name", NEW_SECRETS)
def test_preflight_rejects_a_placeholder_or_short_value_of_each_new_secret(name: str) -> None:
    example = read_env_file(ENV_EXAMPLE)
    assert example[name].startswith("changeme-"), f".env.example: {name} needs a placeholder"
    assert name in command_args(compose()["services"]["preflight"])
    assert_rejected(run_preflight({**real_looking_env(), name: example[name]}), name, "placeholder")
    short = run_preflight({**real_looking_env(), name: "s3cret"})
    assert_rejected(short, name, "shorter than 16")


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
