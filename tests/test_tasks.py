"""leukemia.tasks: the DAGs' steps as plain functions, and the one conversion of Params."""

from __future__ import annotations

from pathlib import Path

import pytest

from leukemia.config import RUN_DEFAULTS
from leukemia.tasks.training_dag import RunRequest, plan


def test_plan_fills_params_the_dag_does_not_show_from_the_config_defaults() -> None:
    params = {
        "optimizers": ["adam", "sgd"],
        "batch_sizes": [16],
        "variants": ["seed"],
        "heads": ["mlp"],
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


def test_the_work_store_defaults_to_the_run_bucket_and_carries_a_non_default_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LEUKEMIA_WORK_URI", raising=False)
    monkeypatch.setenv("LEUKEMIA_BUCKET", "images")
    assert RunRequest().work_uri == "s3://images/work/"
    assert RunRequest(bucket="other").work_uri == "s3://other/work/"
    assert RunRequest(bucket="other", conn_id="site_s3").work_uri == "s3://site_s3@other/work/"
    monkeypatch.setenv("LEUKEMIA_WORK_URI", "file:///srv/leukemia/work")
    assert RunRequest(bucket="other").work_uri == "file:///srv/leukemia/work/"
    assert RunRequest.from_params({"extract_shards": "3"}).extract_shards == 3


def test_plan_extraction_settles_weights_precision_and_cache_folder_for_every_shard() -> None:
    from leukemia.tasks.training_dag import features_of, plan_extraction

    split = {"images": 1200, "work_uri": "s3://b/work/"}
    request = RunRequest(weights="none", input_size=64, precision="auto")
    shards = plan_extraction(split, request)
    assert [(s["shard"], s["shards"]) for s in shards] == [(0, 3), (1, 3), (2, 3)]
    assert {s["cache_dir"] for s in shards} == {
        f"s3://b/work/features/none-64px-{shards[0]['precision']}-masked"
    }
    assert shards[0]["precision"] in ("float32", "bfloat16")  # auto is resolved once, here
    two = plan_extraction(split, RunRequest(weights="none", extract_shards=2))
    assert len(two) == 2
    done = [{"cache_dir": "s3://b/work/f/k", "images": 5, "computed": 1}] * 2
    assert features_of(done) == {
        "cache_dir": "s3://b/work/f/k",
        "backend": "keras",
        "images": 10,
        "computed": 2,
        "shards": 2,
    }
    with pytest.raises(ValueError, match="expected one cache folder"):
        features_of([*done, {"cache_dir": "s3://b/work/f/other", "images": 1, "computed": 0}])


def test_int8_extraction_is_planned_into_its_networks_folder_and_mixed_backends_are_refused(
    tmp_path: Path,
) -> None:
    from leukemia import backends
    from leukemia.dataset import write_split_csv
    from leukemia.features import backend_of, cache_dir_for
    from leukemia.model import ModelConfig
    from leukemia.tasks.training_dag import features_of, plan_extraction

    rows = [
        {"path": f"Benign/{i}.jpg", "label": "Benign", "sha256": f"{i:064x}", "split": split}
        for i, split in enumerate(["train"] * 6 + ["val", "test"])
    ]
    path = write_split_csv(rows, tmp_path / "split.csv")
    split = {"images": len(rows), "work_uri": "s3://b/work/", "path": str(path)}
    request = RunRequest(weights="none", input_size=64, precision="float32", backend="int8")
    shard = plan_extraction(split, request)[0]
    cfg = ModelConfig(input_size=64, weights="none", backend="int8")
    calibration = backends.training_calibration(
        {r["sha256"]: r["path"] for r in rows}, [r["sha256"] for r in rows[:7]], 64
    )
    key = backends.features_key(cfg, calibration)
    assert shard["backend"] == "int8" and backend_of(shard["cache_dir"]) == "int8"
    assert shard["cache_dir"] == cache_dir_for("s3://b/work/features", cfg, "float32", key)
    assert shard["cache_dir"] == f"s3://b/work/features/none-64px-int8-{key}-masked"
    assert shard["fallback_cache_dir"] == "s3://b/work/features/none-64px-float32-masked"
    keras = plan_extraction(split, RunRequest(weights="none", input_size=64, precision="float32"))
    assert keras[0]["cache_dir"] == keras[0]["fallback_cache_dir"] == shard["fallback_cache_dir"]
    done = {"images": 4, "computed": 4}
    fell_back = {"cache_dir": shard["fallback_cache_dir"], "backend": "keras", **done}
    with pytest.raises(ValueError, match="some workers could not run int8 and fell back"):
        features_of([{"cache_dir": shard["cache_dir"], "backend": "int8", **done}, fell_back])
    assert features_of([fell_back])["backend"] == "keras"


def test_plan_has_one_config_per_head_and_carries_the_cv_folds() -> None:
    params = {"optimizers": ["adam"], "batch_sizes": [16], "variants": ["seed"], "cv_folds": "3"}
    request = RunRequest.from_params({**params, "heads": ["mlp", "linear"], "refit": 0})
    assert request.heads == ("mlp", "linear") and request.refit is False
    configs = plan(request)
    assert [(c["head"], c["cv_folds"]) for c in configs] == [("mlp", 3), ("linear", 3)]
    # no heads asked for: both heads, the documented default
    assert [c["head"] for c in plan(RunRequest.from_params(params))] == ["mlp", "linear"]


def test_refit_off_hands_the_selected_run_on_unchanged() -> None:
    from leukemia.tasks.training_dag import refit

    candidate = {"run_id": "abc", "cv_f1_macro_mean": 0.9}
    out = refit(candidate, {"path": "unused"}, {"cache_dir": "unused"}, enabled=False)
    assert out == {**candidate, "selected_run_id": "abc", "refit": False}


def test_run_request_takes_the_gate_and_approval_from_the_policy_and_tightens_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from leukemia.gate import Thresholds

    for name in ("LEUKEMIA_REQUIRE_APPROVAL", "LEUKEMIA_MIN_F1_MACRO", "LEUKEMIA_PROMOTION_MARGIN"):
        monkeypatch.delenv(name, raising=False)
    assert RunRequest.from_params({}).require_approval is False  # the demo, dags test
    monkeypatch.setenv("LEUKEMIA_REQUIRE_APPROVAL", "true")
    assert RunRequest.from_params({}).require_approval is True  # the compose stack
    monkeypatch.setenv("LEUKEMIA_MIN_F1_MACRO", "0.8")
    assert RunRequest.from_params({"min_f1_macro": None}).min_f1_macro == 0.8  # empty: policy
    run = RunRequest.from_params(
        {
            "require_approval": True,
            "approval_respondents": ["dr-lee"],
            "approval_timeout_hours": "0.5",
            "min_f1_macro": "0.85",
            "promotion_margin": 0.01,
        }
    )
    assert run.require_approval is True and run.approval_respondents == ("dr-lee",)
    assert run.approval_timeout_hours == 0.5
    assert run.thresholds() == Thresholds(
        0.85,
        RUN_DEFAULTS.min_malignant_sensitivity,
        RUN_DEFAULTS.min_benign_specificity,
        0.01,
    )


def test_run_request_refuses_a_conf_that_switches_the_gate_and_approval_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 22 #3: the conf that promoted a macro-F1 0.31 model 'by the gate'."""
    from leukemia.policy import PolicyViolation

    monkeypatch.setenv("LEUKEMIA_REQUIRE_APPROVAL", "true")
    for name in ("MIN_F1_MACRO", "MIN_MALIGNANT_SENSITIVITY", "MIN_BENIGN_SPECIFICITY"):
        monkeypatch.delenv(f"LEUKEMIA_{name}", raising=False)
    bypass = {
        "require_approval": False,
        "min_f1_macro": 0,
        "min_malignant_sensitivity": 0,
        "min_benign_specificity": 0,
    }
    with pytest.raises(PolicyViolation) as refused:
        RunRequest.from_params(bypass)
    message = str(refused.value)
    assert "\n" not in message
    for part in (
        "min_f1_macro 0 < 0.9 (LEUKEMIA_MIN_F1_MACRO)",
        "min_malignant_sensitivity 0 < 0.99 (LEUKEMIA_MIN_MALIGNANT_SENSITIVITY)",
        "min_benign_specificity 0 < 0.9 (LEUKEMIA_MIN_BENIGN_SPECIFICITY)",
        "require_approval false while LEUKEMIA_REQUIRE_APPROVAL is true",
    ):
        assert part in message
