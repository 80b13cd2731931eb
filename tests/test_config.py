"""leukemia.config: run-time defaults and allowed values, the scoring tasks' MLflow login."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from leukemia.config import (
    ENV_DEFAULTS,
    OPTIMIZERS,
    PRECISIONS,
    RUN_DEFAULTS,
    VARIANTS,
    project_root,
    scoring_mlflow_login,
)


def test_dataclass_defaults_equal_the_config_defaults() -> None:
    from leukemia.model import ModelConfig
    from leukemia.training import TrainConfig

    model_fields = [f for f in dataclasses.fields(ModelConfig) if f.name != "weights"]
    train_fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    for f in model_fields + train_fields:
        assert f.default == getattr(RUN_DEFAULTS, f.name), f"{f.name} differs from config"
    assert ModelConfig().weights == ENV_DEFAULTS["LEUKEMIA_WEIGHTS"][0]
    assert TrainConfig().model == ModelConfig()


def test_allowed_values_equal_what_the_library_accepts() -> None:
    from leukemia.features import resolve_precision
    from leukemia.model import VARIANTS as MODEL_VARIANTS
    from leukemia.training import OPTIMIZERS as TRAINING_OPTIMIZERS

    assert OPTIMIZERS == TRAINING_OPTIMIZERS
    assert VARIANTS == tuple(MODEL_VARIANTS)
    assert [resolve_precision(p) for p in PRECISIONS if p != "auto"] == ["float32", "bfloat16"]
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_precision("float16")


def test_grid_defaults_are_allowed_values() -> None:
    assert set(RUN_DEFAULTS.optimizers) <= set(OPTIMIZERS)
    assert set(RUN_DEFAULTS.variants) <= set(VARIANTS)
    assert RUN_DEFAULTS.optimizer in OPTIMIZERS and RUN_DEFAULTS.variant in VARIANTS
    assert RUN_DEFAULTS.precision in PRECISIONS
    with pytest.raises(dataclasses.FrozenInstanceError):
        RUN_DEFAULTS.epochs = 1  # type: ignore[misc]


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


def test_project_root_is_the_checkout_that_holds_dags() -> None:
    root = project_root()
    assert root == Path(__file__).resolve().parents[1]
    assert (root / "dags" / "leukemia_training.py").is_file()
