"""The embedded demo as a newcomer runs it: offline, hermetic, and clear about failures."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from leukemia.dev.demo import airflow, choose_weights, demo_size
from leukemia.dev.diagnosis import dags_test_errors
from leukemia.dev.progress import DagTestProgress
from leukemia.weights import WeightsUnavailable

ROOT = Path(__file__).resolve().parents[1]
#: the demo's hermeticity, progress and diagnosis are tested, not selection, the copies or the
#: audit (test_dags runs those end to end): a grid of two (the default heads), no CV, no augmented
#: copies, a 4-image audit
TINY = (
    '{"optimizers": ["adam"], "batch_sizes": [8], "variants": ["seed"], "epochs": 2, '
    '"cv_folds": 1, "augment_copies": 0, "audit_images": 4}'
)
LOG = """\
2026-11-27T11:35:34.664436Z [info     ] [DAG TEST] starting task_id=extract_features map_index=-1 [x]
2026-11-27T11:35:42.603676Z [error    ] Task failed with exception     [task] loc=task_runner.py:1676
Traceback (most recent call last):
  File "x.py", line 1, in f
OSError: Unable to open file (file signature not found)

The above exception was the direct cause of the following exception:

airflow.sdk.exceptions.AirflowFailException: cannot load VGG16 weights from /w.h5: bad file
2026-11-27T11:35:42.686677Z [info     ] [DAG TEST] end task task_id=extract_features map_index=-1 [x]
2026-11-27T11:35:42.686867Z [info     ] [DAG TEST] starting task_id=train map_index=3 [x]
2026-11-27T11:35:42.703676Z [error    ] Task failed with exception     [task] loc=task_runner.py:1676
ValueError: first attempt
2026-11-27T11:35:43.686677Z [info     ] [DAG TEST] starting task_id=train map_index=3 [x]
2026-11-27T11:35:43.703676Z [error    ] Task failed with exception     [task] loc=task_runner.py:1676
KeyError: 'second attempt'
2026-11-27T11:35:44.686677Z [info     ] [DAG TEST] starting task_id=report map_index=-1 [x]
ValueError: printed by a task that succeeded
"""


_STAMP = "2026-11-27T11:30:{:06.3f}Z [info     ] "
_API = "[airflow.api_fastapi.execution_api.routes.task_instances] loc=task_instances.py:485"


def _instance(
    task_id: str, index: int, start_s: float, end_s: float, state: str, *between: str
) -> list[str]:
    """What `airflow dags test` prints for one task instance, Airflow's own lines in between."""
    return [
        _STAMP.format(start_s) + f"[DAG TEST] starting task_id={task_id} map_index={index} [x]",
        *between,
        _STAMP.format(end_s - 0.5) + f"Task instance state updated {_API} new_state={state}",
        _STAMP.format(end_s) + f"[DAG TEST] end task task_id={task_id} map_index={index} [x]",
    ]


#: `airflow dags test` output as it streams: two shards of extraction, a grid of two trainings
#: (train[0] fails once and is retried), and the lines of Airflow's own that come between.
STREAM = [
    *_instance("sync_images", -1, 0.1, 5.3, "success", _STAMP.format(1) + "Task started  [x]"),
    *_instance(
        "extract_features", 0, 5.4, 15.4, "success", "WARNING: All log messages before absl"
    ),
    *_instance("extract_features", 1, 15.5, 27.5, "success"),
    *_instance(
        "train",
        0,
        27.6,
        28.6,
        "up_for_retry",
        _STAMP.format(28) + "Task failed with exception     [task] loc=task_runner.py:1",
        "ValueError: first attempt",
    ),
    *_instance("train", 0, 29.6, 33.6, "success"),
    *_instance("train", 1, 33.7, 39.7, "failed"),
]
#: What the demo prints for STREAM (times in UTC): one line per finished task instance.
PROGRESS = [
    "sync_images              success         5.2 s   11:30:00 → 11:30:05",
    "extract_features[0]      success        10.0 s   11:30:05 → 11:30:15   extraction 1/2 done, "
    "ETA 10 s",
    "extract_features[1]      success        12.0 s   11:30:15 → 11:30:27   extraction 2/2 done",
    "train[0]                 up_for_retry    1.0 s   11:30:27 → 11:30:28   grid 0/2 done",
    "train[0]                 success         4.0 s   11:30:29 → 11:30:33   grid 1/2 done, ETA 4 s",
    "train[1]                 failed          6.0 s   11:30:33 → 11:30:39   grid 2/2 done",
]


@pytest.fixture()
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC, so that the clock times printed are those of the log."""
    import time

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_progress_prints_one_line_per_task_with_seconds_and_k_of_n_done(
    utc: None, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[str] = []

    def total(task_id: str) -> int | None:
        asked.append(task_id)
        return 2

    with DagTestProgress(live=False, total=total) as progress:
        for line in STREAM:
            progress.feed(line + "\n")
    out = capsys.readouterr().out
    assert out.splitlines() == PROGRESS
    assert asked == ["extract_features", "train"]  # once per mapped task, when it first starts


def test_progress_without_the_instance_count_still_counts_what_is_done(utc: None) -> None:
    out = io.StringIO()
    with DagTestProgress(out, live=False) as progress:
        for line in STREAM[4:11]:  # the two shards of extraction
            progress.feed(line)
    assert [line.split("   ")[-1] for line in out.getvalue().splitlines()] == [
        "extraction 1/? done",
        "extraction 2/? done",
    ]


def test_progress_names_the_halving_rounds_grid_round_2_and_3(utc: None) -> None:
    out = io.StringIO()
    stream = [
        *_instance("train_round2", 0, 40.0, 45.0, "success"),
        *_instance("train_round3", 0, 46.0, 52.0, "success"),
    ]
    with DagTestProgress(out, live=False, total=lambda task_id: 1) as progress:
        for line in stream:
            progress.feed(line + "\n")
    assert [line.split("   ")[-1] for line in out.getvalue().splitlines()] == [
        "grid round 2 1/1 done",
        "grid round 3 1/1 done",
    ]


def test_progress_on_a_terminal_prints_the_same_lines_above_its_bar(utc: None) -> None:
    out = io.StringIO()
    with DagTestProgress(out, live=True, total=lambda task_id: 2) as progress:
        for line in STREAM:
            progress.feed(line)
    printed = [line.rstrip() for line in out.getvalue().splitlines() if "→" in line]
    assert printed == PROGRESS


def test_airflows_own_lines_go_to_the_log_file_and_only_progress_to_stdout(
    utc: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recorded = tmp_path / "recorded.log"
    recorded.write_text("\n".join(STREAM) + "\n")
    fake = tmp_path / "bin" / "airflow"  # the `airflow` beside the interpreter: prints the log
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncat {recorded}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake.parent / "python"))
    log_file = tmp_path / "last_run.log"
    with DagTestProgress(live=False, total=lambda task_id: 2) as progress:
        airflow(["dags", "test"], dict(os.environ), log_file=log_file, on_line=progress.feed)
    assert capsys.readouterr().out.splitlines() == PROGRESS
    assert log_file.read_text() == recorded.read_text()


def _demo(environ: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "leukemia", "demo", "--size", "48", "--per-class", "4", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_dags_test_errors_keep_the_last_exception_line_of_each_failed_attempt() -> None:
    assert dags_test_errors(LOG) == {
        "extract_features": "AirflowFailException: cannot load VGG16 weights from /w.h5: bad file",
        "train[3]": "KeyError: 'second attempt'",
    }


def test_demo_runs_a_random_trunk_at_64_px_unless_a_size_is_asked_for() -> None:
    assert demo_size(None, "none") == 64  # learnable from a random trunk, a tenth of the cost
    assert demo_size(None, "imagenet") == 224 and demo_size(None, "/w/vgg16.h5") == 224
    assert demo_size(96, "none") == 96


def test_unavailable_imagenet_falls_back_to_none_only_on_synthetic_smears(
    offline: dict[str, str], tmp_path: Path
) -> None:
    weights, notice = choose_weights("imagenet", synthetic=True)
    assert weights == "none"
    assert notice is not None and "\n" not in notice
    assert "could not be downloaded" in notice and "weights=none" in notice
    with pytest.raises(WeightsUnavailable, match="LEUKEMIA_WEIGHTS"):
        choose_weights("imagenet", synthetic=False)
    with pytest.raises(WeightsUnavailable, match="missing.h5 does not exist"):
        choose_weights(str(tmp_path / "missing.h5"), synthetic=True)  # a named file must exist
    assert choose_weights("none", synthetic=False) == ("none", None)


@pytest.mark.slow
def test_offline_demo_falls_back_registers_a_champion_and_writes_only_its_workdir(
    offline: dict[str, str], tmp_path: Path
) -> None:
    workdir, cwd = tmp_path / "work", tmp_path / "cwd"
    proc = _demo(offline, cwd, "--workdir", str(workdir), "--conf", TINY)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    notices = [line for line in proc.stdout.splitlines() if line.startswith("Notice: ")]
    assert len(notices) == 2  # up front, and again under the summary
    assert "could not be downloaded" in notices[0] and "weights=none" in notices[0]
    assert "=== Champion ===" in proc.stdout
    assert "leukemia-classifier v1" in proc.stdout
    # progress, not Airflow's log: one line per task, the grid's k of n; the log in its file
    assert len(proc.stdout.splitlines()) <= 60, proc.stdout
    # no library lines on the terminal: TensorFlow's C++ start-up lines, Airflow's, MLflow's and
    # our own INFO logging stay off stderr (TensorFlow's in setup.log)
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
    assert (workdir / "setup.log").is_file()
    assert "[DAG TEST]" not in proc.stdout and "Task instance state updated" not in proc.stdout
    assert re.search(r"^sync_images +success +\d+\.\d s ", proc.stdout, re.MULTILINE)
    assert re.search(r"^train\[\d\] +success .* grid 2/(2|\?) done$", proc.stdout, re.MULTILINE)
    assert "[DAG TEST] starting task_id=train" in (workdir / "last_run.log").read_text()
    assert '"weights": "none"' in proc.stdout
    assert list(Path(offline["HOME"]).iterdir()) == []  # no ~/airflow, ~/.keras, ~/.config
    assert list(cwd.iterdir()) == []  # no ./mlruns
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("leukemia-classifier", "champion")
    assert str(champion.version) == "1"
    # after the champion ships: an incoming batch scored, what it refers reviewed over the REST
    # API, and each label a new training image in raw/<Class>/ (every one: on 16 training images
    # too few are held out for a conformal threshold, so every image is referred)
    after = proc.stdout.split("=== After the champion ships: referral and review ===", 1)[1]
    referred = int(re.search(r"(\d+) referred to a person", after).group(1))
    landed = int(re.search(r"(\d+) labelled images? landed in raw/", after).group(1))
    assert referred == landed == 10, after  # 4 clear smears and 6 blends
    assert re.search(r"^  raw/Pre/: review-[0-9a-f]{12}\.jpg", after, re.MULTILINE), after
    assert "Required Actions" in after and "demo-reviewer" in after


@pytest.mark.slow
def test_demo_on_real_images_without_weights_stops_before_starting(
    offline: dict[str, str], tmp_path: Path, smear_dir: Path
) -> None:
    workdir = tmp_path / "work"
    proc = _demo(offline, tmp_path / "cwd", "--workdir", str(workdir), "--data", str(smear_dir))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: VGG16 ImageNet weights could not be downloaded")
    assert "LEUKEMIA_WEIGHTS" in lines[-1]
    assert not (workdir / "airflow").exists() and not (workdir / "mlflow.db").exists()


@pytest.mark.slow
def test_failed_demo_ends_with_a_short_diagnosis(offline: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.weights.h5"
    bad.write_bytes(b"not an HDF5 file")
    workdir = tmp_path / "work"
    proc = _demo(
        offline, tmp_path / "cwd", "--workdir", str(workdir), "--weights", str(bad), "--conf", TINY
    )
    assert proc.returncode == 1
    tail = proc.stdout.split("=== The pipeline failed ===", 1)[1].strip().splitlines()
    assert len(tail) <= 15
    assert tail[0].startswith("leukemia_training run manual__")
    assert tail[1].startswith(
        f"  plan_extraction: AirflowFailException: cannot load VGG16 weights from {bad}"
    )
    # (select_candidate and the halving rounds' prune steps ran, and skipped: nothing finished)
    assert tail[2] == (
        "  not run because of them: approval, audit, ensemble, extract_features, fine_tune, "
        "keep_champion, promote, refit, register_and_gate, reject, report, train, train_round2, "
        "train_round3"
    )
    assert tail[3] == f"Full output with the task logs: {workdir / 'last_run.log'}"
    log = (workdir / "last_run.log").read_text()
    assert "Task failed with exception" in log
    assert log.count("[DAG TEST] starting task_id=plan_extraction") == 1  # no retry
    assert re.search(r"^plan_extraction +failed +\d+\.\d s ", proc.stdout, re.MULTILINE)
    assert "Task failed with exception" not in proc.stdout  # Airflow's lines stay in the log
