"""leukemia.tasks: the DAGs' steps as plain functions, and the one conversion of Params."""

from __future__ import annotations

import pytest

from leukemia.config import RUN_DEFAULTS
from leukemia.tasks.training_dag import RunRequest, plan


def test_plan_fills_params_the_dag_does_not_show_from_the_config_defaults() -> None:
    params = {
        "optimizers": ["adam", "sgd"],
        "batch_sizes": [16],
        "variants": ["seed"],
        "epochs": 3,
        "input_size": 64,
        "weights": "none",
        "learning_rate": None,
    }
    configs = plan(RunRequest.from_params(params))
    assert [(c["optimizer"], c["batch_size"], c["variant"]) for c in configs] == [
        ("adam", 16, "seed"),
        ("sgd", 16, "seed"),
    ]
    for c in configs:
        assert c["patience"] == RUN_DEFAULTS.patience and c["seed"] == RUN_DEFAULTS.seed
        assert c["head_units"] == list(RUN_DEFAULTS.head_units)
        assert c["dropout"] == RUN_DEFAULTS.dropout and c["learning_rate"] is None


def test_run_request_types_every_param_once_and_defaults_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEUKEMIA_WEIGHTS", "/w/vgg16.h5")
    run = RunRequest.from_params(
        {
            "bucket": "b",
            "optimizers": ["sgd"],
            "batch_sizes": ["16", 32],
            "epochs": "4",
            "learning_rate": "",
            "promotion_margin": 1,
            "force_retrain": 1,
            "precision": None,
            "unknown": "ignored",
        }
    )
    assert run.bucket == "b" and run.optimizers == ("sgd",) and run.batch_sizes == (16, 32)
    assert run.epochs == 4 and run.learning_rate is None
    assert run.promotion_margin == 1.0 and isinstance(run.promotion_margin, float)
    assert run.force_retrain is True and run.precision == RUN_DEFAULTS.precision
    assert run.weights == "/w/vgg16.h5"  # not a Param here: the environment's default
    assert RunRequest.from_params({"learning_rate": 0.01}).learning_rate == 0.01


def test_ingest_upload_without_a_source_says_which_param_to_set() -> None:
    from leukemia.tasks.ingest_dag import upload

    with pytest.raises(ValueError, match="set the `source` Param"):
        upload("", "bucket", "raw/", "aws_default")
