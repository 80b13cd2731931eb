"""Why a run failed, in a few lines: the one account both the demo and the stack print.

Airflow writes a task's errors in two forms: `airflow dags test` (the demo) prints every task's log
lines, tracebacks included, to its output; a Celery worker (the stack) writes one JSON object per
line into the task's log file. `dags_test_errors` and `task_log_errors` read each form;
`failure_report` turns what they found into the same short account: the run, each failed task with
its last error line (and where it ran), the tasks that did not run because of them, and the log to
read next. Development tooling, never imported by production code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from leukemia.dev.airflow_rest import task_label
from leukemia.dev.progress import STARTING

_STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Unavailable)\b.*?: ")
#: Failed tasks listed one by one; the rest are counted.
LISTED = 8


def dags_test_errors(log_text: str) -> dict[str, str]:
    """The last exception line of each task that failed, from `airflow dags test` output."""
    errors: dict[str, str] = {}
    task, in_traceback, last = "", False, ""
    for line in [*log_text.splitlines(), "0000-00-00T end"]:
        if _STAMPED.match(line):
            if in_traceback and task and last:
                errors[task] = last
            in_traceback, last = "Task failed with exception" in line, ""
            if started := STARTING.search(line):
                task = task_label(started.group(1), int(started.group(2)))
        elif in_traceback and _EXCEPTION.match(line):
            last = re.sub(r"^[\w.]+\.(\w+:)", r"\1", line.strip())  # without the module path
    return errors


def task_log_errors(text: str, limit: int = 5) -> list[str]:
    """`event: ExcType: message at <library file>:<line>` for the error lines of a task log file
    (Airflow 3 writes JSON lines); the last `limit`."""
    errors = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("level") not in ("error", "critical"):
            continue
        details = entry.get("error_detail") or [{}]
        exc = details[-1]
        frames = exc.get("frames", [])
        where = [
            f for f in frames if "/leukemia/" in f["filename"] and "/dev/" not in f["filename"]
        ]
        place = f" at {where[-1]['filename']}:{where[-1]['lineno']}" if where else ""
        cause = f": {exc.get('exc_type')}: {exc.get('exc_value')}" if exc.get("exc_type") else ""
        errors.append(f"{entry.get('event')}{cause}{place}"[:600])
    return errors[-limit:]


@dataclass(frozen=True)
class FailedTask:
    """One task instance that failed: its label, its error lines, and where it ran (if known)."""

    label: str
    errors: Sequence[str]
    where: str = ""


def failure_report(
    dag_id: str,
    run_id: str,
    failed: Sequence[FailedTask],
    blocked: Sequence[str],
    log_hint: str,
    state: str = "failed",
) -> list[str]:
    """The account of a run that did not succeed: one line per failed task (its first error line,
    further ones indented), the tasks not run because of them, and where the full output is."""
    lines = [f"{dag_id} run {run_id} {state}:"]
    for task in failed[:LISTED]:
        place = f" on {task.where}" if task.where else ""
        first, *more = [*task.errors] or ["no error line in the output"]
        lines.append(f"  {task.label}{place}: {first[:300]}")
        lines += [f"      {line[:300]}" for line in more]
    if len(failed) > LISTED:
        lines.append(f"  … and {len(failed) - LISTED} more failed tasks")
    names = sorted({label.split("[")[0] for label in blocked})
    if names:
        lines.append(f"  not run because of them: {', '.join(names)}")
    lines.append(log_hint)
    return lines


def from_states(
    dag_id: str,
    run_id: str,
    states: Sequence[tuple[str, str]],
    errors: Mapping[str, Sequence[str]],
    log_hint: str,
) -> list[str]:
    """`failure_report` from (task label, state) pairs and the error lines found per label."""
    failed = [FailedTask(label, errors.get(label, ())) for label, s in states if s == "failed"]
    blocked = [label for label, s in states if s == "upstream_failed"]
    return failure_report(dag_id, run_id, failed, blocked, log_hint)
