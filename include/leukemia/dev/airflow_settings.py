"""Airflow settings the local stack shares with docker-compose.yaml, read from that one file.

The compose file's `x-airflow-common` environment is the deployment's Airflow configuration. The
local stack (`leukemia.dev.stack`) takes the settings that mean the same on one machine from it
(`SHARED`: executor, auth manager and its users, examples, paused-at-creation, the training queue)
and sets only what must differ locally itself: addresses and ports, paths, secrets, and the demo's
loose promotion policy. Development tooling, never imported by production code.
"""

from __future__ import annotations

import re
from pathlib import Path

from leukemia.dev.processes import StackError

#: x-airflow-common settings the stack uses exactly as docker-compose.yaml sets them.
SHARED: tuple[str, ...] = (
    "AIRFLOW__CORE__EXECUTOR",
    "AIRFLOW__CORE__AUTH_MANAGER",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
    "AIRFLOW__CORE__LOAD_EXAMPLES",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION",
    "LEUKEMIA_TRAINING_QUEUE",
)

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?([^}]*)\}")


def compose_file() -> Path:
    """The checkout's docker-compose.yaml."""
    from leukemia.config import project_root

    return project_root() / "docker-compose.yaml"


def compose_airflow_env(path: Path | None = None) -> dict[str, str]:
    """The `x-airflow-common` environment of the compose file, as written (`${...}` unresolved)."""
    import yaml

    path = path or compose_file()
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise StackError(f"cannot read {path} ({exc}): run the stack from a checkout") from None
    environment = (doc.get("x-airflow-common") or {}).get("environment")
    if not isinstance(environment, dict):
        raise StackError(f"{path} has no x-airflow-common environment mapping: restore it")
    return {str(k): str(v) for k, v in environment.items()}


def with_defaults(name: str, value: str) -> str:
    """`value` with each `${VAR:-default}` replaced by its default, as compose does without .env."""

    def default(match: re.Match[str]) -> str:
        if match.group(2) is None or match.group(3):
            raise StackError(
                f"{name} in docker-compose.yaml needs {match.group(0)} set: give it a "
                f"${{{match.group(1)}:-default}} or drop {name} from airflow_settings.SHARED"
            )
        return match.group(2)

    return _VARIABLE.sub(default, value)


def shared_settings(path: Path | None = None) -> dict[str, str]:
    """The `SHARED` settings with the values docker-compose.yaml gives them."""
    compose = compose_airflow_env(path)
    missing = [name for name in SHARED if name not in compose]
    if missing:
        raise StackError(
            f"docker-compose.yaml's x-airflow-common no longer sets {', '.join(missing)}: "
            "set them there or drop them from leukemia.dev.airflow_settings.SHARED"
        )
    return {name: with_defaults(name, compose[name]) for name in SHARED}


def admin_user(settings: dict[str, str]) -> str:
    """The first user of the simple auth manager (`name:ROLE,...`): the one the stack logs in as."""
    return settings["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",")[0].split(":")[0]
