"""The command line: the champion commands (history and rollback, with one-line errors, exit 2)
and the prediction output formats."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

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


def _predictions() -> list[Any]:
    from leukemia.predict import Prediction

    return [
        Prediction(
            "a.jpg", "Pre", (0.05, 0.02, 0.55, 0.38), "3", ("Pre", "Pro"), True, "uncertain"
        ),
        Prediction("long-name.jpg", "Benign", (0.97, 0.01, 0.01, 0.01), "3"),
    ]


def test_predict_table_has_a_set_column_and_a_refer_column_with_the_reason() -> None:
    from leukemia.cli import _PredictionWriter

    out = io.StringIO()
    writer = _PredictionWriter(out, "table", len("long-name.jpg"))
    for item in _predictions():
        writer.row(item)
    writer.close()
    header, first, second = out.getvalue().splitlines()
    assert header.split() == [
        *("image", "class", "Benign", "Early", "Pre", "Pro", "call", "model", "set", "refer")
    ]
    for column in ("set", "refer"):  # aligned under the header
        at = header.index(column)
        assert first[at:].split()[0] == {"set": "Pre|Pro", "refer": "yes:"}[column]
        assert second[at:].split()[0] == {"set": "Benign", "refer": "no"}[column]
    assert first.endswith("yes: uncertain") and second.endswith("  no")


def test_predict_csv_and_json_carry_the_set_and_the_referral() -> None:
    from leukemia.cli import _PredictionWriter

    out = io.StringIO()
    writer = _PredictionWriter(out, "csv", 5)
    for item in _predictions():
        writer.row(item)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["prediction_set"], r["refer"], r["refer_reason"]) for r in rows] == [
        ("Pre|Pro", "true", "uncertain"),
        ("Benign", "false", ""),
    ]
    assert list(rows[0])[:8] == [
        *("image", "class", "Benign", "Early", "Pre", "Pro", "malignant", "model_version")
    ]  # the older columns keep their places
    out = io.StringIO()
    writer = _PredictionWriter(out, "json", 5)
    for item in _predictions():
        writer.row(item)
    writer.close()
    first = json.loads(out.getvalue())[0]
    assert (first["prediction_set"], first["refer"], first["refer_reason"]) == (
        ["Pre", "Pro"],
        True,
        "uncertain",
    )
