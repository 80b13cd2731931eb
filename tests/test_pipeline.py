"""leukemia.pipeline: the training DAG's steps as plain functions."""

from __future__ import annotations

from leukemia.config import RUN_DEFAULTS
from leukemia.pipeline import plan


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
    configs = plan(params)
    assert [(c["optimizer"], c["batch_size"], c["variant"]) for c in configs] == [
        ("adam", 16, "seed"),
        ("sgd", 16, "seed"),
    ]
    for c in configs:
        assert c["patience"] == RUN_DEFAULTS.patience and c["seed"] == RUN_DEFAULTS.seed
        assert c["head_units"] == list(RUN_DEFAULTS.head_units)
        assert c["dropout"] == RUN_DEFAULTS.dropout and c["learning_rate"] is None
