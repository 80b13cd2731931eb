"""Create the pipeline's MLflow users, its experiment and registered model, and the grants (the
compose stack's `mlflow-init` job).

The MLflow server runs MLflow's basic-auth app with `default_permission = NO_PERMISSIONS`
(docker/mlflow/basic_auth.ini), so a user sees only what it is granted. Logged in as the admin,
this makes two users; logged in as the training user, it creates the pipeline's experiment
(`LEUKEMIA_EXPERIMENT`) and registered model (`LEUKEMIA_MODEL_NAME`), so that the training user
owns them (MLflow gives the creator MANAGE) before anyone else can create them:

    MLFLOW_TRAINING_USERNAME   EDIT on every experiment and model, MANAGE on the pipeline's two:
                               create runs, log artifacts, register versions, move aliases
    MLFLOW_SCORING_USERNAME    READ on the pipeline's experiment and model and nothing else:
                               resolve @champion and download it (a grant on every experiment
                               or model that an earlier version of this job made is revoked)

Idempotent: an existing user gets the password from the environment, a grant at another level is
replaced, an existing experiment or model is kept (its grants are set as above whoever created
it). Standard library only, so it runs in any image with Python 3.9+.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

#: Grants on every resource of a type (`*`) per role.
GRANTS = {
    "training": (("experiment", "EDIT"), ("registered_model", "EDIT")),
    "scoring": (),
}
#: Grants on the pipeline's own experiment and registered model per role.
OWN_GRANTS = {"training": "MANAGE", "scoring": "READ"}
DEFAULT_EXPERIMENT = "leukemia-vgg16"
DEFAULT_MODEL = "leukemia-classifier"


class SetupError(Exception):
    """A problem the operator has to fix; the message says what to do."""


class MlflowAdmin:
    """The handful of MLflow auth REST calls this job needs, as the admin user."""

    def __init__(self, url: str, username: str, password: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        self.timeout_s = timeout_s

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of one request; `body` goes in the query string for GET."""
        url = f"{self.url}{path}"
        data = None
        if body is not None and method == "GET":
            url += "?" + urllib.parse.urlencode(body)
        elif body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")
        try:
            payload = json.loads(text) if text else {}
        except ValueError:
            payload = {"message": text.strip()}
        return status, payload if isinstance(payload, dict) else {"message": str(payload)}

    def check(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Like `call`, but a non-200 answer is a SetupError naming the call."""
        status, payload = self.call(method, path, body)
        if status != 200:
            raise SetupError(f"{method} {path} answered HTTP {status}: {message(payload)}")
        return payload


def message(payload: dict[str, Any]) -> str:
    return str(payload.get("message") or payload.get("error_code") or payload)[:300]


def wait_until_up(admin: MlflowAdmin, timeout_s: float) -> None:
    """Wait for /health (compose already waits for the health check; this covers a restart)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{admin.url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SetupError(
                    f"MLflow at {admin.url} is not up after {timeout_s:.0f} s ({exc}): check "
                    "`docker compose logs mlflow`"
                ) from None
        time.sleep(1)


def check_admin(admin: MlflowAdmin, username: str) -> None:
    """The admin credentials work and belong to an admin."""
    status, payload = admin.call("GET", "/api/2.0/mlflow/users/current")
    if status == 401:
        raise SetupError(
            f"MLflow rejected the login of admin {username!r}: MLflow sets the admin password only "
            "when its user store is created, so after changing MLFLOW_ADMIN_PASSWORD in .env change "
            "it in MLflow too (docs/security.md, 'Rotating secrets')"
        )
    if status != 200:
        raise SetupError(f"cannot read the current MLflow user: HTTP {status}: {message(payload)}")
    if not payload.get("user", {}).get("is_admin"):
        raise SetupError(
            f"MLflow user {username!r} is not an admin: set MLFLOW_ADMIN_USERNAME to the admin "
            "that the server created on its first start"
        )


def ensure_user(admin: MlflowAdmin, username: str, password: str) -> str:
    """Create `username`, or set its password when it exists; returns what was done."""
    status, payload = admin.call(
        "POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password}
    )
    if status == 200:
        return "created"
    if payload.get("error_code") != "RESOURCE_ALREADY_EXISTS":
        raise SetupError(
            f"cannot create MLflow user {username!r}: HTTP {status}: {message(payload)}"
        )
    admin.check(
        "PATCH",
        "/api/2.0/mlflow/users/update-password",
        {"username": username, "password": password},
    )
    return "password updated"


def ensure_resources(session: MlflowAdmin, experiment: str, model: str) -> tuple[str, list[str]]:
    """Create the pipeline's experiment and registered model as `session`'s user (the training
    user, who then owns them), or find them; returns the experiment id and what was done."""
    done = []
    status, payload = session.call(
        "GET", "/api/2.0/mlflow/experiments/get-by-name", {"experiment_name": experiment}
    )
    if status == 200:
        experiment_id = str(payload["experiment"]["experiment_id"])
        done.append(f"experiment {experiment} exists")
    elif payload.get("error_code") == "RESOURCE_DOES_NOT_EXIST":
        created = session.check("POST", "/api/2.0/mlflow/experiments/create", {"name": experiment})
        experiment_id = str(created["experiment_id"])
        done.append(f"experiment {experiment} created")
    else:
        raise SetupError(
            f"cannot read experiment {experiment!r} as the training user: HTTP {status}: "
            f"{message(payload)}"
        )
    status, payload = session.call(
        "POST", "/api/2.0/mlflow/registered-models/create", {"name": model}
    )
    if status == 200:
        done.append(f"registered model {model} created")
    elif payload.get("error_code") == "RESOURCE_ALREADY_EXISTS":
        done.append(f"registered model {model} exists")
    else:
        raise SetupError(
            f"cannot create registered model {model!r} as the training user: HTTP {status}: "
            f"{message(payload)}"
        )
    return experiment_id, done


def ensure_grant(
    admin: MlflowAdmin, username: str, resource_type: str, permission: str, resource_id: str = "*"
) -> None:
    """Give `username` exactly `permission` on one resource, or on every one of its type (`*`)."""
    grant = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
    status, payload = admin.call(
        "POST", "/api/3.0/mlflow/users/permissions/grant", {**grant, "permission": permission}
    )
    if status == 200:
        return
    if payload.get("error_code") != "RESOURCE_ALREADY_EXISTS":
        raise SetupError(
            f"cannot grant {permission} on {resource_type} {resource_id} to {username!r}: "
            f"HTTP {status}: "
            f"{message(payload)}"
        )
    current = admin.check("GET", "/api/3.0/mlflow/users/permissions/get", grant)
    if current.get("permission") == permission:
        return
    admin.check("POST", "/api/3.0/mlflow/users/permissions/revoke", grant)
    admin.check(
        "POST", "/api/3.0/mlflow/users/permissions/grant", {**grant, "permission": permission}
    )


def revoke_grant(
    admin: MlflowAdmin, username: str, resource_type: str, resource_id: str = "*"
) -> None:
    """Remove `username`'s grant on a resource (or on every one of its type), if it has one."""
    grant = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
    status, payload = admin.call("POST", "/api/3.0/mlflow/users/permissions/revoke", grant)
    if status != 200 and payload.get("error_code") != "RESOURCE_DOES_NOT_EXIST":
        raise SetupError(
            f"cannot revoke {username!r}'s grant on {resource_type} {resource_id}: HTTP {status}: "
            f"{message(payload)}"
        )


def required(name: str, environ: dict[str, str]) -> str:
    value = environ.get(name, "")
    if not value:
        raise SetupError(f"{name} is not set: set it in .env (see .env.example)")
    return value


def setup(environ: dict[str, str]) -> list[str]:
    """Make the users and grants the environment names; returns one line per user."""
    url = environ.get("MLFLOW_URL", "http://mlflow:5000")
    admin_name = required("MLFLOW_ADMIN_USERNAME", environ)
    users = {
        role: (
            required(f"MLFLOW_{role.upper()}_USERNAME", environ),
            required(f"MLFLOW_{role.upper()}_PASSWORD", environ),
        )
        for role in GRANTS
    }
    names = [admin_name] + [name for name, _ in users.values()]
    if len(set(names)) != len(names):
        raise SetupError(
            "MLFLOW_ADMIN_USERNAME, MLFLOW_TRAINING_USERNAME and MLFLOW_SCORING_USERNAME must be "
            f"three different users, got {names}"
        )
    admin = MlflowAdmin(url, admin_name, required("MLFLOW_ADMIN_PASSWORD", environ))
    wait_until_up(admin, float(environ.get("MLFLOW_WAIT_S", "120")))
    check_admin(admin, admin_name)
    actions = {
        role: ensure_user(admin, username, password) for role, (username, password) in users.items()
    }
    ensure_grant(admin, users["training"][0], "experiment", "EDIT")
    experiment = environ.get("LEUKEMIA_EXPERIMENT") or DEFAULT_EXPERIMENT
    model = environ.get("LEUKEMIA_MODEL_NAME") or DEFAULT_MODEL
    training = MlflowAdmin(url, *users["training"])
    experiment_id, done = ensure_resources(training, experiment, model)
    for role, (username, _) in users.items():
        for resource_type, permission in GRANTS[role]:
            ensure_grant(admin, username, resource_type, permission)
        granted = {t for t, _ in GRANTS[role]}
        for resource_type in {"experiment", "registered_model"} - granted:
            revoke_grant(admin, username, resource_type)
        own = OWN_GRANTS[role]
        ensure_grant(admin, username, "experiment", own, experiment_id)
        ensure_grant(admin, username, "registered_model", own, model)
        grants = ", ".join(f"{p} on every {t}" for t, p in GRANTS[role]) or "nothing else"
        done.append(
            f"{role} user {username}: {actions[role]}; {own} on experiment {experiment} and "
            f"model {model}; {grants}"
        )
    return done


def main() -> int:
    try:
        lines = setup(dict(os.environ))
    except SetupError as exc:
        print(f"mlflow-init: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(f"mlflow-init: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
