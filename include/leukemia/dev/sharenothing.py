"""Did a run share nothing? The stack's checks of a finished run, and what its task logs say.

Two ways a task can lean on another host's disk: it reaches into another worker's folder (the
worker's fence, `leukemia.dev.hostfence`, records each attempt) or an XCom hands a local path from
one task to the next. `RunResult.share_nothing_report()` lists both. Development tooling, never
imported by production code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from leukemia.dev.airflow_rest import TaskRecord


class ShareNothingViolation(AssertionError):
    """A task reached another worker's disk, or XCom carried a local path from one task to another."""


@dataclass(frozen=True)
class RunResult:
    """A finished (or abandoned) DAG run: its state, task instances and what crossed hosts."""

    run_id: str
    state: str
    tasks: list[TaskRecord]
    wall_s: float
    fence_hits: list[dict[str, str]] = field(default_factory=list)
    xcom_paths: list[str] = field(default_factory=list)

    def of(self, *task_ids: str) -> list[TaskRecord]:
        """The instances of these tasks (every map index of a mapped one)."""
        return [t for t in self.tasks if t.task_id in task_ids]

    def hosts(self, *task_ids: str) -> set[str]:
        """The workers that ran instances of these tasks."""
        return {t.hostname for t in self.of(*task_ids) if t.hostname}

    def span_s(self, *task_ids: str) -> float | None:
        """Wall time of (mapped) tasks: first start to last end of their instances."""
        spans = [(t.start, t.end) for t in self.of(*task_ids) if t.start and t.end]
        if not spans:
            return None
        return (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()

    def share_nothing_report(self) -> list[str]:
        """One line per breach of share-nothing; empty when the run kept to its own disks."""
        lines = [
            f"{h.get('host')}: task {h.get('task_id') or '?'} ({h.get('event')}) reached "
            f"{h.get('path')}"
            for h in self.fence_hits
        ]
        lines += [f"XCom carries a local path: {p}" for p in self.xcom_paths]
        return lines


def fence_hits(fence_logs: Iterable[Path]) -> list[dict[str, str]]:
    """Every attempt recorded in these hosts' fence logs to reach a folder not their own."""
    from leukemia.dev.hostfence import read_log

    return [hit for path in fence_logs for hit in read_log(path)]


def xcom_local_paths(xcoms: Iterable[tuple[str, str, str]], root: Path) -> list[str]:
    """`task[map]: key = path` for each XCom (label, key, JSON text) naming a file under `root`."""
    pattern = re.compile(re.escape(str(root)) + r"[^\"'\s,}\]]*")
    found: dict[tuple[str, str], str] = {}  # (task, path) -> the XCom key that carries it
    for label, key, text in xcoms:
        for path in pattern.findall(text):
            if key != "return_value" or (label, path) not in found:
                found[(label, path)] = key  # a named key says more than return_value
    return [f"{label}: {key} = {path}" for (label, path), key in sorted(found.items())]
