"""The one account of a failed run that the demo and the stack both print."""

from __future__ import annotations

from leukemia.dev.diagnosis import LISTED, FailedTask, failure_report, from_states


def test_failure_report_lists_each_failed_task_with_where_it_ran_and_its_error_lines() -> None:
    failed = [
        FailedTask(
            "train[1]", ["ValueError: bad batch at runs.py:9", "(log: /w/a.log)"], "wb (failed)"
        ),
        FailedTask("refit", []),
    ]
    lines = failure_report(
        "leukemia_training", "manual__1", failed, ["promote", "report", "train[3]"], "Logs: /w"
    )
    assert lines == [
        "leukemia_training run manual__1 failed:",
        "  train[1] on wb (failed): ValueError: bad batch at runs.py:9",
        "      (log: /w/a.log)",
        "  refit: no error line in the output",
        "  not run because of them: promote, report, train",
        "Logs: /w",
    ]


def test_failure_report_counts_the_failed_tasks_past_the_listed_ones() -> None:
    failed = [FailedTask(f"train[{i}]", [f"KeyError: {i}"]) for i in range(LISTED + 3)]
    lines = failure_report("d", "r", failed, [], "hint")
    assert lines[LISTED] == f"  train[{LISTED - 1}]: KeyError: {LISTED - 1}"
    assert lines[LISTED + 1] == "  … and 3 more failed tasks"


def test_from_states_takes_failed_and_upstream_failed_apart() -> None:
    states = [("extract_features[0]", "failed"), ("train[0]", "upstream_failed"), ("x", "success")]
    lines = from_states("d", "r", states, {"extract_features[0]": ["OSError: gone"]}, "hint")
    assert lines[1:3] == [
        "  extract_features[0]: OSError: gone",
        "  not run because of them: train",
    ]
