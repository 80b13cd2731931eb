"""leukemia.config: the scoring tasks' MLflow login."""

from __future__ import annotations

import os

import pytest

from leukemia.config import scoring_mlflow_login


def test_scoring_login_switches_and_restores_mlflow_login(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "leukemia-training")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("LEUKEMIA_SCORING_MLFLOW_USERNAME", "leukemia-scoring")
    monkeypatch.setenv("LEUKEMIA_SCORING_MLFLOW_PASSWORD", "scoring-password")
    with pytest.raises(RuntimeError, match="inside"), scoring_mlflow_login():
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "leukemia-scoring"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "scoring-password"
        raise RuntimeError("inside")
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "leukemia-training"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_scoring_login_without_a_scoring_user_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LEUKEMIA_SCORING_MLFLOW_USERNAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    with scoring_mlflow_login():
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "someone"


def test_scoring_login_needs_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEUKEMIA_SCORING_MLFLOW_USERNAME", "leukemia-scoring")
    monkeypatch.delenv("LEUKEMIA_SCORING_MLFLOW_PASSWORD", raising=False)
    with pytest.raises(ValueError, match="LEUKEMIA_SCORING_MLFLOW_PASSWORD is empty"):
        with scoring_mlflow_login():
            pass
