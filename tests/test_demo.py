"""The embedded demo as a newcomer runs it: offline, hermetic, and clear about failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from leukemia.dev.demo import choose_weights, demo_size, task_errors
from leukemia.weights import WeightsUnavailable

ROOT = Path(__file__).resolve().parents[1]
TINY = '{"optimizers": ["adam"], "batch_sizes": [8, 16], "variants": ["seed"], "epochs": 2}'
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


def test_task_errors_keep_the_last_exception_line_of_each_failed_attempt() -> None:
    assert task_errors(LOG) == {
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
    assert '"weights": "none"' in proc.stdout
    assert list(Path(offline["HOME"]).iterdir()) == []  # no ~/airflow, ~/.keras, ~/.config
    assert list(cwd.iterdir()) == []  # no ./mlruns
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("leukemia-classifier", "champion")
    assert str(champion.version) == "1"


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
    assert tail[2] == (
        "  not run because of them: approval, audit, ensemble, extract_features, fine_tune, "
        "keep_champion, promote, refit, register_and_gate, reject, report, select_candidate, train"
    )
    assert tail[3] == f"Full output with the task logs: {workdir / 'last_run.log'}"
    assert "Task failed with exception" in (workdir / "last_run.log").read_text()
    assert proc.stdout.count("[DAG TEST] starting task_id=plan_extraction") == 1  # no retry
