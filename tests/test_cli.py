"""The command line's champion commands: history and rollback, with one-line errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from leukemia.cli import main


def test_champion_commands_stop_in_one_line_without_a_tracking_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LEUKEMIA_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["champion", "history"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no MLflow database at")
    assert main(["champion", "rollback", "--to", "1"]) == 2
    assert not (tmp_path / "nowhere").exists()  # no empty store made on the way


def test_champion_history_says_when_nothing_was_recorded(
    mlflow_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from leukemia import registry, tracking

    tracking.setup()
    registry.client().create_registered_model("leukemia-classifier")
    assert main(["champion", "history"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "no recorded moves of @champion of leukemia-classifier",
        "@champion now: none",
    ]


def test_a_rollback_to_an_unknown_version_is_refused_and_moves_nothing(
    mlflow_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from leukemia import registry, tracking

    tracking.setup()
    registry.client().create_registered_model("leukemia-classifier")
    assert main(["champion", "rollback", "--to", "5", "--reason", "test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # MLflow logs its store's creation
    assert err.startswith("error: leukemia-classifier has no version 5 in MLflow at")
    assert err.endswith("lists the versions that were champion")
    assert registry.history() == [] and registry.current_champion() is None
