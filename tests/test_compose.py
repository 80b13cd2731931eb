"""Static checks of the production stack: docker-compose.yaml, .env.example and the Dockerfiles.

They need no Docker engine. The compose file is read the way Compose reads it (YAML with merge
keys, then `${VAR}` interpolation from .env.example) and validated against the Compose
Specification's JSON schema: tests/data/compose-spec.json is a verbatim copy of
schema/compose-spec.json from github.com/compose-spec/compose-spec (Apache-2.0).
When a `docker compose` or `docker-compose` binary is present, it parses the file as well.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
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
}
ONE_SHOT_SERVICES = {"airflow-init", "minio-init"}
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
    assert "8080:8080" in services["airflow-apiserver"]["ports"]
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
    assert REQUIRED_SERVICES - {"postgres", "redis", "minio", "minio-init", "mlflow"} <= set(
        services
    )
    for name, service in services.items():
        env = environment(service)
        assert {k: env.get(k) for k in common_env} == common_env, f"{name} lost common env"
        mounts = dict(v.split(":")[:2] for v in service["volumes"])
        for source, target in AIRFLOW_MOUNTS.items():
            assert mounts.get(source) == target, f"{name} does not mount {source} at {target}"
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
    # The working folder is a named volume, so all workers on the host share it.
    mounts = dict(v.split(":")[:2] for v in doc["services"]["airflow-worker"]["volumes"])
    data_volume = next(src for src, dst in mounts.items() if dst == env["LEUKEMIA_DATA_DIR"])
    assert data_volume in doc["volumes"]


def test_compose_sets_only_settings_the_library_knows() -> None:
    """A misspelt LEUKEMIA_* variable would silently fall back to the library's default."""
    config = pytest.importorskip("leukemia.config")
    known = getattr(config, "ENV_DEFAULTS", None)
    if not isinstance(known, dict):
        pytest.skip("leukemia.config has no ENV_DEFAULTS table")
    env = environment(compose()["x-airflow-common"])
    unknown = {k for k in env if k.startswith("LEUKEMIA_")} - set(known)
    assert not unknown, f"the library does not read {sorted(unknown)}"


def test_minio_init_creates_both_buckets() -> None:
    doc = compose()
    services = doc["services"]
    init_env = environment(services["minio-init"])
    script = " ".join(command_args(services["minio-init"]))
    airflow_env = environment(doc["x-airflow-common"])
    assert init_env["IMAGE_BUCKET"] == airflow_env["LEUKEMIA_BUCKET"]
    assert init_env["RAW_PREFIX"] == airflow_env["LEUKEMIA_RAW_PREFIX"]
    args = command_args(services["mlflow"])
    destination = args[args.index("--artifacts-destination") + 1]
    assert destination == f"s3://{init_env['ARTIFACT_BUCKET']}/"
    for var in ("IMAGE_BUCKET", "ARTIFACT_BUCKET"):
        assert re.search(rf"mc mb --ignore-existing \"local/\$\{{{var}\}}\"", script), var
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
