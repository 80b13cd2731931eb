"""What `airflow dags test` is doing, in a few lines: one per task, a bar for each mapped task.

`airflow dags test` logs `[DAG TEST] starting task_id=... map_index=...` and `[DAG TEST] end task
...` around each task instance, and the execution API logs each instance's `new_state=...` in
between. `DagTestProgress` reads that stream line by line (the demo sends Airflow's own lines only
to its log file) and prints, per finished task instance, its state, seconds, start and end; for a
mapped task (feature extraction, the grid's trainings) also k of n done and an ETA. On a terminal a
`rich` progress bar shows the running task and each mapped task's bar; elsewhere (CI, a pipe) the
same lines are printed plain. Development tooling, never imported by production code.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, TextIO

from leukemia.dev.airflow_rest import task_label

STARTING = re.compile(r"\[DAG TEST\] starting task_id=(\S+) map_index=(-?\d+)")
ENDING = re.compile(r"\[DAG TEST\] end task task_id=(\S+) map_index=(-?\d+)")
_NEW_STATE = re.compile(r"\bnew_state=(\w+)")
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z?\s")
_FAILED = "Task failed with exception"

#: States after which an instance will not run again in this run (up_for_retry will).
FINAL_STATES = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})

#: What the bar of a mapped task is called.
BAR_NAMES = {
    "extract_features": "extraction",
    "train": "grid",
    "train_round2": "grid round 2",
    "train_round3": "grid round 3",
}


def _clock(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%H:%M:%S") if moment else "?"


@dataclass
class _Mapped:
    """A mapped task's progress: its instance count (when known) and its finished instances."""

    total: int | None = None
    seconds: dict[int, float] = field(default_factory=dict)  # map index -> seconds, final only

    def eta_s(self) -> float | None:
        if self.total is None or not self.seconds:
            return None
        mean = sum(self.seconds.values()) / len(self.seconds)
        return mean * max(self.total - len(self.seconds), 0)

    def counts(self) -> str:
        done = len(self.seconds)
        return f"{done}/{self.total}" if self.total is not None else f"{done}/?"


class DagTestProgress:
    """Reads `airflow dags test` output line by line; prints one line per finished task instance.

    `total(task_id)` says how many instances a mapped task has (None while not known); `live`
    chooses the animated bar (default: when `out` is a terminal).
    """

    def __init__(
        self,
        out: TextIO | None = None,
        live: bool | None = None,
        total: Callable[[str], int | None] = lambda task_id: None,
    ) -> None:
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.total = total
        self.mapped: dict[str, _Mapped] = {}
        self._task: tuple[str, int] | None = None
        self._started: datetime | None = None
        self._state: str | None = None
        self._bar: Any = None  # rich.progress.Progress while live
        self._bar_ids: dict[str, Any] = {}
        self._running_id: Any = None

    def __enter__(self) -> DagTestProgress:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            console = Console(file=self.out, highlight=False)
            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._bar.start()
            self._running_id = self._bar.add_task("waiting for the first task", total=None)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def feed(self, line: str) -> None:
        """Take one line of `airflow dags test` output."""
        if started := STARTING.search(line):
            self._start(started.group(1), int(started.group(2)), _time_of(line))
        elif ended := ENDING.search(line):
            self._end(ended.group(1), int(ended.group(2)), _time_of(line))
        elif self._task is not None:
            if state := _NEW_STATE.search(line):
                self._state = state.group(1)
            elif _FAILED in line and self._state is None:
                self._state = "failed"

    def _start(self, task_id: str, map_index: int, at: datetime | None) -> None:
        self._task, self._started, self._state = (task_id, map_index), at, None
        if map_index >= 0:
            mapped = self.mapped.setdefault(task_id, _Mapped())
            if mapped.total is None:
                mapped.total = self.total(task_id)
            self._update_bar(task_id, mapped)
        if self._bar is not None:
            self._bar.update(self._running_id, description=task_label(task_id, map_index))

    def _end(self, task_id: str, map_index: int, at: datetime | None) -> None:
        state = self._state or "finished"
        seconds = (at - self._started).total_seconds() if at and self._started else 0.0
        line = (
            f"{task_label(task_id, map_index):24} {state:12} {seconds:6.1f} s   "
            f"{_clock(self._started)} → {_clock(at)}"
        )
        if map_index >= 0:
            mapped = self.mapped.setdefault(task_id, _Mapped())
            if state in FINAL_STATES:
                mapped.seconds[map_index] = seconds
            eta = mapped.eta_s()
            name = BAR_NAMES.get(task_id, task_id)
            line += f"   {name} {mapped.counts()} done"
            if eta:
                line += f", ETA {eta:.0f} s"
            self._update_bar(task_id, mapped)
        self._task, self._started, self._state = None, None, None
        self._print(line)

    def _update_bar(self, task_id: str, mapped: _Mapped) -> None:
        if self._bar is None:
            return
        if task_id not in self._bar_ids:
            name = BAR_NAMES.get(task_id, task_id)
            self._bar_ids[task_id] = self._bar.add_task(name, total=mapped.total)
        bar = self._bar_ids[task_id]
        self._bar.update(bar, total=mapped.total, completed=len(mapped.seconds))

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, soft_wrap=True)
        else:
            print(line, file=self.out, flush=True)


def _time_of(line: str) -> datetime | None:
    """The time stamp that starts an Airflow log line."""
    match = _TIMESTAMP.match(line)
    if not match:
        return None
    return datetime.fromisoformat(match.group(1) + "+00:00")
