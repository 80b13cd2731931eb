"""leukemia.config: run-time defaults and allowed values, the scoring tasks' MLflow login."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from leukemia.config import (
    BACKENDS,
    OPTIMIZERS,
    PRECISIONS,
    RUN_DEFAULTS,
    VARIANTS,
    project_root,
    scoring_mlflow_login,
)


def test_a_default_dag_run_trains_each_configuration_with_the_librarys_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The DAG's path (Params → RunRequest → plan) and the library's (TrainConfig()) agree: a
    setting the request drops, or a default declared twice, would make them differ."""
    from leukemia.model import ModelConfig
    from leukemia.tasks.training_dag import RunRequest, plan
    from leukemia.training import TrainConfig

    monkeypatch.delenv("LEUKEMIA_WEIGHTS", raising=False)
    configs = [TrainConfig.from_dict(c) for c in plan(RunRequest.from_params({}))]
    assert len(configs) == len(RUN_DEFAULTS.optimizers) * len(RUN_DEFAULTS.batch_sizes) * len(
        RUN_DEFAULTS.variants
    ) * len(RUN_DEFAULTS.heads)
    for cfg in configs:
        library = TrainConfig(
            optimizer=cfg.optimizer,
            batch_size=cfg.batch_size,
            model=ModelConfig(variant=cfg.model.variant, head=cfg.model.head),
        )
        assert cfg == library


def test_a_runs_conformal_coverage_reaches_every_configuration_and_is_bounded() -> None:
    """Declared once (`RunDefaults.conformal_coverage`): the conf's value is in every planned
    `TrainConfig` (and so in its logged config); a coverage of 0 or 1 is refused."""
    from leukemia.tasks.training_dag import RunRequest, plan
    from leukemia.training import TrainConfig

    assert RUN_DEFAULTS.conformal_coverage == TrainConfig().conformal_coverage == 0.95
    configs = plan(RunRequest.from_params({"conformal_coverage": "0.9"}))
    assert {c["conformal_coverage"] for c in configs} == {0.9}
    assert TrainConfig.from_dict(configs[0]).conformal_coverage == 0.9
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="conformal_coverage must be between 0 and 1"):
            TrainConfig(conformal_coverage=bad)


def test_allowed_values_equal_what_the_library_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    from leukemia import backends, features
    from leukemia.features import resolve_precision
    from leukemia.model import VARIANTS as MODEL_VARIANTS
    from leukemia.model import ModelConfig
    from leukemia.training import OPTIMIZERS as TRAINING_OPTIMIZERS

    assert OPTIMIZERS == TRAINING_OPTIMIZERS
    assert VARIANTS == tuple(MODEL_VARIANTS)
    assert BACKENDS == backends.BACKENDS == (RUN_DEFAULTS.backend, "int8")
    assert [ModelConfig(backend=b).backend for b in BACKENDS] == list(BACKENDS)
    with pytest.raises(ValueError, match="unknown backend 'fp16': choose one of keras, int8"):
        ModelConfig(backend="fp16")
    monkeypatch.setattr(features, "bf16_supported", lambda: True)  # bfloat16 is refused without
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
