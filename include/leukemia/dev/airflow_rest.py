"""Airflow's REST API v2, driven as the UI drives it: a token from `/auth/token`, then JSON calls.

The local stack (`leukemia.dev.stack`) triggers and watches its runs with this client; stdlib only
(urllib, no proxy: everything is on loopback). Development tooling, never imported by production
code.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from leukemia.dev.processes import StackError

DAG_ID = "leukemia_training"


def http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, Any]:
    """One JSON request; returns (status, decoded body). Status 0: nothing answers."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(request, timeout=timeout_s) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except OSError:
        return 0, None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def task_label(task_id: str, map_index: int) -> str:
    """`task` for a task, `task[3]` for one instance of a mapped task."""
    return task_id if map_index < 0 else f"{task_id}[{map_index}]"


@dataclass(frozen=True)
class TaskRecord:
    """One task instance of a DAG run, as the REST API reports it."""

    task_id: str
    map_index: int
    state: str | None
    hostname: str | None
    start: datetime | None
    end: datetime | None
    try_number: int

    @property
    def label(self) -> str:
        return task_label(self.task_id, self.map_index)

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return (self.end - self.start).total_seconds()


class AirflowClient:
    """REST API v2 calls as one user of the simple auth manager (the token is fetched once)."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url
        self._login = {"username": username, "password": password}
        self._token: str | None = None

    def healthy(self) -> bool:
        """True when the api-server answers its health check."""
        return http("GET", f"{self.base_url}/api/v2/monitor/health")[0] == 200

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """One call under /api/v2; returns (status, decoded body)."""
        if self._token is None:
            status, answer = http("POST", f"{self.base_url}/auth/token", self._login)
            if status not in (200, 201):
                raise StackError(f"no API token: /auth/token answered {status}: {answer}")
            self._token = answer["access_token"]
        return http(method, f"{self.base_url}/api/v2{path}", body, self._token)

    def dag_params(self, dag_id: str = DAG_ID) -> set[str]:
        """Names of the Params the served DAG accepts."""
        status, details = self.api("GET", f"/dags/{dag_id}/details")
        if status != 200:
            raise StackError(f"GET /dags/{dag_id}/details answered {status}: {details}")
        return set((details.get("params") or {}).keys())

    def trigger(self, conf: dict[str, Any], dag_id: str = DAG_ID) -> str:
        """Unpause the DAG and trigger a run with `conf`, as the UI's trigger form does."""
        status, answer = self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        if status != 200:
            raise StackError(f"could not unpause {dag_id}: {status} {answer}")
        status, answer = self.api(
            "POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf}
        )
        if status not in (200, 201):
            raise StackError(f"could not trigger {dag_id}: {status} {answer}")
        return str(answer["dag_run_id"])

    def run_state(self, run_id: str, dag_id: str = DAG_ID) -> str | None:
        """The run's state (`queued`, `running`, `success`, `failed`); None when not answered."""
        run = urllib.parse.quote(run_id, safe="")
        status, answer = self.api("GET", f"/dags/{dag_id}/dagRuns/{run}")
        return str(answer.get("state")) if status == 200 else None

    def task_instances(self, run_id: str, dag_id: str = DAG_ID) -> list[TaskRecord]:
        """Every task instance of a run, with the host each ran on."""
        run = urllib.parse.quote(run_id, safe="")
        status, answer = self.api("GET", f"/dags/{dag_id}/dagRuns/{run}/taskInstances?limit=1000")
        if status != 200:
            raise StackError(f"listing task instances answered {status}: {answer}")
        return [
            TaskRecord(
                t["task_id"],
                int(t["map_index"]),
                t.get("state"),
                t.get("hostname") or None,
                _parse_time(t.get("start_date")),
                _parse_time(t.get("end_date")),
                int(t.get("try_number") or 0),
            )
            for t in answer["task_instances"]
        ]

    def xcoms(self, run_id: str, dag_id: str = DAG_ID) -> list[tuple[str, str, str]]:
        """(task label, key, value as JSON text) for each XCom of the run."""
        run = urllib.parse.quote(run_id, safe="")
        base = f"/dags/{dag_id}/dagRuns/{run}/taskInstances"
        status, answer = self.api("GET", f"{base}/~/xcomEntries?limit=1000")
        if status != 200:
            raise StackError(f"listing XComs answered {status}: {answer}")
        entries = []
        for entry in answer.get("xcom_entries", []):
            key, task_id, index = entry["key"], entry["task_id"], int(entry["map_index"])
            status, value = self.api(
                "GET", f"{base}/{task_id}/xcomEntries/{urllib.parse.quote(key)}?map_index={index}"
            )
            text = json.dumps(value.get("value") if isinstance(value, dict) else value)
            entries.append((task_label(task_id, index), key, text))
        return entries
