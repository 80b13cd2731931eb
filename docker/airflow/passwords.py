"""The api-server's entrypoint: the UI logins' passwords file from .env, then Airflow.

Airflow's SimpleAuthManager reads its users from `[core] simple_auth_manager_users` and their
passwords from the JSON file `[core] simple_auth_manager_passwords_file`. It generates a password
for every user missing from that file, writes it there in plain text and prints it to the log.
This script writes the file first, with a password for every user, so that it never does:

- the user `AIRFLOW_ADMIN_USERNAME` gets `AIRFLOW_ADMIN_PASSWORD`;
- any other user NAME gets `AIRFLOW_PASSWORD_<NAME>` (upper case, other characters than letters
  and digits as `_`: `AIRFLOW_PASSWORD_JANE_DOE` for `jane.doe`).

A user without a password, or with one shorter than 16 characters, stops the api-server with one
line naming the variable. The file is rewritten on every start (mode 600), so a changed password
takes effect with `docker compose up -d`; it lives on a tmpfs of the api-server's own, never in the
bind-mounted ./config. Nothing here prints a password, and Airflow starts without the password
variables in its environment.

Usage: passwords.py COMMAND [ARG]...   writes the file, then replaces itself with COMMAND.
Standard library only: it runs with the Airflow image's Python before Airflow is imported.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

USERS = "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"
PASSWORDS_FILE = "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
MIN_LENGTH = 16
HINT = "generate one with `openssl rand -hex 24` and put it in .env"


class SetupError(Exception):
    """A setting is missing or unusable; the message says which and what to do."""


def usernames(users: str) -> list[str]:
    """The names in `simple_auth_manager_users` (`name:role[:teams]`, comma-separated)."""
    return [entry.strip().split(":", 1)[0] for entry in users.split(",") if entry.strip()]


def password_variable(username: str, environ: dict[str, str]) -> str:
    """The environment variable that holds `username`'s password."""
    if username == environ.get("AIRFLOW_ADMIN_USERNAME"):
        return "AIRFLOW_ADMIN_PASSWORD"
    return "AIRFLOW_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", username.upper())


def passwords(environ: dict[str, str]) -> dict[str, str]:
    """Username -> password for every configured user, all from `environ`."""
    names = usernames(environ.get(USERS, ""))
    if not names:
        raise SetupError(f"{USERS} names no user: set it to name:ROLE[,name:ROLE...]")
    found = {}
    for name in names:
        variable = password_variable(name, environ)
        value = environ.get(variable, "")
        if not value:
            raise SetupError(f"user {name!r} has no password: set {variable}; {HINT}")
        if "changeme" in value.lower():
            raise SetupError(f"{variable} still holds the .env.example placeholder; {HINT}")
        if len(value) < MIN_LENGTH:
            raise SetupError(f"{variable} is shorter than {MIN_LENGTH} characters; {HINT}")
        found[name] = value
    return found


def write_passwords(path: Path, logins: dict[str, str]) -> None:
    """Replace `path` with the JSON object `logins`, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 600
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(logins, fh)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: passwords.py COMMAND [ARG]...", file=sys.stderr)
        return 2
    environ = dict(os.environ)
    try:
        target = environ.get(PASSWORDS_FILE, "")
        if not target:
            raise SetupError(f"{PASSWORDS_FILE} is not set: name the file the api-server reads")
        logins = passwords(environ)
        write_passwords(Path(target), logins)
    except (SetupError, OSError) as exc:
        print(f"api-server: {exc}", file=sys.stderr)
        return 1
    print(f"api-server: passwords of {', '.join(logins)} set from the environment", flush=True)
    names = {password_variable(name, environ) for name in logins}
    os.execvpe(argv[0], argv, {k: v for k, v in environ.items() if k not in names})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
