"""Waiting for a Human-in-the-loop task to ask: the run whose task is `awaiting_input`, read from
the embedded stack's SQLite metadata database, read-only (`airflow dags test` or `dag.test()` writes
it meanwhile). Development tooling: the demo, the review screenshot and the tests answer forms
through it; production code never imports it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

#: A task in one of these states will not ask anyone in this run.
ENDED_STATES = frozenset({"skipped", "failed", "upstream_failed"})


def task_states(db: Path, dag_id: str, task_ids: Sequence[str]) -> list[tuple[str, str]]:
    """(run id, state) of the DAG's task instances of `task_ids`, newest first; [] while the
    database cannot be read (locked by the writer, or not there yet)."""
    marks = ", ".join("?" for _ in task_ids)
    query = (
        f"SELECT run_id, state FROM task_instance WHERE dag_id = ? AND task_id IN ({marks}) "
        "ORDER BY start_date DESC"
    )
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)) as conn:
            return [(str(r), str(s)) for r, s in conn.execute(query, (dag_id, *task_ids))]
    except sqlite3.Error:
        return []


def parked_run(
    db: Path,
    dag_id: str,
    task_id: str,
    timeout_s: float = 300,
    before: Sequence[str] = (),
    ended: Callable[[], bool] | None = None,
    poll_s: float = 0.5,
) -> str | None:
    """The run id once `task_id` waits for an answer; None when it (or a task of `before`, the
    ones that lead to it) ended skipped or failed first, when `ended()` turns true (e.g. the
    process running the DAG exited), or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = task_states(db, dag_id, (task_id, *before))
        waiting = [run for run, state in rows if state == "awaiting_input"]
        if waiting:
            return waiting[0]
        if {state for _, state in rows} & ENDED_STATES or (ended is not None and ended()):
            return None
        time.sleep(poll_s)
    return None
