"""The promotion gate: MLflow's evaluation and validation on clinical thresholds, intervals, fail closed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukemia.config import BENIGN, CLASSES
from leukemia.gate import (
    FAILED,
    NOT_APPLICABLE,
    NOT_MEASURED,
    PASSED,
    Thresholds,
    bootstrap_intervals,
    check_thresholds,
    matrix_metrics,
)

GOOD = {"f1_score": 0.95, "malignant_sensitivity": 0.995, "benign_specificity": 0.93}


def _status(checks: list) -> dict[str, str]:
    return {c.name: c.status for c in checks}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_metrics_equal_scikit_learn(seed: int) -> None:
    """The bootstrap computes metrics from confusion matrices: they must be scikit-learn's."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    rng = np.random.default_rng(seed)
    labels = np.asarray(CLASSES)
    y = labels[rng.integers(0, 3 if seed == 2 else 4, 60)]  # seed 2: Pro never occurs
    p = y.copy()
    wrong = rng.random(60) < 0.3
    p[wrong] = labels[rng.integers(0, 4, wrong.sum())]
    got = matrix_metrics(confusion_matrix(y, p, labels=list(CLASSES)))
    assert got["accuracy_score"] == pytest.approx(accuracy_score(y, p))
    assert got["f1_score"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    for c in CLASSES:
        expected = recall_score(y, p, labels=[c], average="macro", zero_division=0)
        assert got[f"recall_{c}"] == pytest.approx(expected)
    assert got["malignant_sensitivity"] == pytest.approx(recall_score(y != BENIGN, p != BENIGN))
    assert got["benign_specificity"] == pytest.approx(recall_score(y == BENIGN, p == BENIGN))


def test_bootstrap_intervals_hold_the_estimate_repeat_and_narrow_with_more_images() -> None:
    small = np.array([[9, 1, 0, 0], [1, 8, 1, 0], [0, 1, 9, 0], [0, 0, 1, 9]])
    intervals = bootstrap_intervals(small)
    point = matrix_metrics(small)
    for name, (low, high) in intervals.items():
        assert low <= float(point[name]) <= high, name
    assert bootstrap_intervals(small) == intervals  # seeded
    low, high = intervals["accuracy_score"]
    big_low, big_high = bootstrap_intervals(small * 20)["accuracy_score"]
    assert big_high - big_low < (high - low) / 2
    perfect = bootstrap_intervals(np.diag([5, 5, 5, 5]))
    assert perfect["malignant_sensitivity"] == [1.0, 1.0]  # collapses: the card says so


def test_thresholds_come_from_the_policy_with_the_margin_as_the_gain_over_the_champion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from leukemia.policy import Policy

    monkeypatch.setenv("LEUKEMIA_MIN_F1_MACRO", "0.5")
    monkeypatch.setenv("LEUKEMIA_PROMOTION_MARGIN", "0.02")
    monkeypatch.delenv("LEUKEMIA_MIN_MALIGNANT_SENSITIVITY", raising=False)
    given = Policy.from_env().thresholds()
    assert given.min_f1_macro == 0.5 and given.min_gain_over_champion == 0.02
    assert given.min_malignant_sensitivity == 0.99  # the documented default
    assert given.max_test_ece == 0.05
    monkeypatch.setenv("LEUKEMIA_MAX_TEST_ECE", "0.03")
    assert Policy.from_env().thresholds().max_test_ece == 0.03


def test_every_missed_threshold_fails_on_its_own_line() -> None:
    bad = {"f1_score": 0.85, "malignant_sensitivity": 0.97, "benign_specificity": 0.93}
    checks = check_thresholds(Thresholds(), bad, GOOD, "3")
    assert _status(checks) == {
        "min_f1_macro": FAILED,
        "min_malignant_sensitivity": FAILED,
        "min_benign_specificity": PASSED,
        "min_gain_over_champion": FAILED,
        "max_test_ece": NOT_MEASURED,  # no test_ece: trained before calibration, does not block
    }
    failed = [c.line for c in checks if c.status == FAILED]
    assert failed == [
        "min_f1_macro: failed: macro-F1 0.8500 vs minimum 0.9",
        "min_malignant_sensitivity: failed: malignant sensitivity 0.9700 vs minimum 0.99",
        "min_gain_over_champion: failed: macro-F1 0.8500 vs champion v3 0.9500 + 0",
    ]


def test_without_a_champion_only_the_absolute_thresholds_decide() -> None:
    checks = check_thresholds(Thresholds(), {**GOOD, "test_ece": 0.02}, None)
    assert _status(checks)["min_gain_over_champion"] == NOT_APPLICABLE
    assert all(c.status == PASSED for c in checks if c.name != "min_gain_over_champion")
    first = {**GOOD, "malignant_sensitivity": 0.98}
    assert (
        _status(check_thresholds(Thresholds(), first, None))["min_malignant_sensitivity"] == FAILED
    )


def test_a_test_ece_above_the_maximum_fails_the_candidate_and_the_report_says_so() -> None:
    from dataclasses import asdict

    from leukemia.promotion import REJECT, automatic_choice, report_markdown

    over = {**GOOD, "test_ece": 0.08}
    checks = check_thresholds(Thresholds(), over, None)
    line = "max_test_ece: failed: test ECE 0.0800 vs maximum 0.05"
    assert [c.line for c in checks if c.status == FAILED] == [line]
    gated = {
        "name": "leukemia-classifier",
        "version": "2",
        "run_id": "r",
        "passed": False,
        "checks": [asdict(c) for c in checks],
        "champion_note": "no champion yet",
    }
    assert f"- {line}" in report_markdown(gated, False).splitlines()  # gate.md
    assert automatic_choice(gated, False).choice == REJECT
    at_limit = check_thresholds(Thresholds(), {**GOOD, "test_ece": 0.05}, None)
    assert [c.line for c in at_limit if c.name == "max_test_ece"] == [
        "max_test_ece: passed: test ECE 0.0500 vs maximum 0.05"
    ]
    looser = check_thresholds(Thresholds(max_test_ece=0.1), over, None)
    assert _status(looser)["max_test_ece"] == PASSED
    with_champion = check_thresholds(Thresholds(), over, GOOD, "1")  # whose metrics lack test_ece
    assert _status(with_champion)["max_test_ece"] == FAILED
    unmeasured = check_thresholds(Thresholds(), GOOD, None)
    assert _status(unmeasured)["max_test_ece"] == NOT_MEASURED
    assert not [c for c in unmeasured if c.status == FAILED]


def test_a_zero_margin_lets_a_tie_pass_and_a_positive_margin_needs_the_gain() -> None:
    tie = check_thresholds(Thresholds(), GOOD, GOOD, "1")
    assert _status(tie)["min_gain_over_champion"] == PASSED
    gain = Thresholds(min_gain_over_champion=0.01)
    assert _status(check_thresholds(gain, GOOD, GOOD, "1"))["min_gain_over_champion"] == FAILED
    better = {**GOOD, "f1_score": 0.97}
    assert _status(check_thresholds(gain, better, GOOD, "1"))["min_gain_over_champion"] == PASSED


# --- on the embedded stack (SQLite MLflow, tiny models) -----------------------------------------

SIZE = 48
OPEN = Thresholds(0.0, 0.0, 0.0, 0.0, 1.0)


#: How the gate's tests train their candidates: what the gate checks does not depend on how they
#: were selected (no cross-validation) or on augmented copies (tested in test_training).
GATE_RUN = {"batch_size": 8, "epochs": 2, "cv_folds": 1, "augment_copies": 0}


def _train(
    smear_dir: Path, workdir: Path, optimizer: str, airflow_run_id: str, cache: dict
) -> dict:
    from leukemia import runs
    from leukemia.model import ModelConfig
    from leukemia.runs import train_folder
    from leukemia.training import TrainConfig

    cfg = TrainConfig(optimizer=optimizer, model=ModelConfig(SIZE, "none"), **GATE_RUN)
    tags = {"airflow_run_id": airflow_run_id}
    if not cache:
        done = train_folder(smear_dir, cfg, workdir, (0.5, 0.25, 0.25), "float32", tags=tags)
        cache.update(split=done["split"], features=done["features"].cache_dir)
    else:
        info = cache["split"]
        runs.train_run(cfg, info.path, smear_dir, cache["features"], tags, info.digest)
    return cache


@pytest.mark.slow
def test_candidate_and_champion_are_evaluated_on_the_same_split_with_mlflow(
    smear_dir: Path, mlflow_env: Path
) -> None:
    import mlflow

    from leukemia import promotion, registry, tracking

    cache: dict = {}
    split = _train(smear_dir, mlflow_env, "adam", "manual__1", cache)["split"]
    experiment_id = tracking.setup()
    first = promotion.select_and_promote(experiment_id, split.path, smear_dir, "manual__1", OPEN)
    assert first["alias"] == "champion" and first["gate"] == "passed"
    _train(smear_dir, mlflow_env, "sgd", "manual__2", cache)
    second = promotion.select_and_promote(experiment_id, split.path, smear_dir, "manual__2", OPEN)

    version = registry.client().get_model_version("leukemia-classifier", second["version"])
    gated = mlflow.artifacts.load_dict(f"runs:/{version.tags['gate.evaluation_run_id']}/gate.json")
    new, old = gated["candidate"], gated["champion"]
    assert old["version"] == first["version"] and new["version"] == second["version"]
    assert new["examples"] == old["examples"] == sum(split.counts["test"].values())
    runs = {
        r.info.run_id: r
        for r in mlflow.search_runs(
            [experiment_id], "tags.kind = 'evaluation'", output_format="list"
        )
    }
    for evaluation in (new, old):
        run = runs[evaluation["run_id"]]
        assert run.data.tags["model_version"] == evaluation["version"]
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "intervals.json"} <= artifacts
        assert run.data.metrics["f1_score"] == pytest.approx(evaluation["metrics"]["f1_score"])
        low, high = evaluation["intervals"]["f1_score"]
        assert low <= evaluation["metrics"]["f1_score"] <= high
    assert (
        version.tags["gate.champion"]
        == f"champion v{first['version']} re-evaluated on the same test split"
    )
    # open thresholds: only the gain over the re-evaluated champion decides, by its test macro-F1
    gained = new["metrics"]["f1_score"] >= old["metrics"]["f1_score"]  # margin 0: not worse
    expected = "passed" if gained else "failed"
    assert version.tags["gate.min_gain_over_champion"].startswith(f"{expected}: macro-F1")
    assert version.tags["gate"] == second["gate"] == expected


@pytest.mark.slow
def test_a_candidate_below_a_clinical_threshold_never_becomes_champion(
    smear_dir: Path, mlflow_env: Path
) -> None:
    from leukemia import promotion, registry, tracking

    split = _train(smear_dir, mlflow_env, "adam", "manual__1", {})["split"]
    unreachable = Thresholds(0.0, 1.01, 0.0, 0.0, 1.0)  # no model reaches a sensitivity above 1
    decided = promotion.select_and_promote(
        tracking.setup(), split.path, smear_dir, "manual__1", unreachable
    )
    assert decided["alias"] == "" and decided["decision"] == "rejected"
    assert decided["failures"] == [
        line for line in decided["checks"] if line.startswith("min_malignant_sensitivity: failed")
    ]
    assert registry.current_champion() is None  # not even a first champion
    version = registry.client().get_model_version("leukemia-classifier", decided["version"])
    assert version.tags["gate"] == "failed"
    assert version.tags["gate.min_malignant_sensitivity"].startswith(
        "failed: malignant sensitivity"
    )
    for kind in ("promotion", "rollback"):
        with pytest.raises(registry.ModelVerificationError, match="failed the promotion gate"):
            registry.move_champion(decided["version"], kind, "by hand", "someone", "test")
    assert registry.current_champion() is None and registry.history() == []


@pytest.mark.slow
def test_an_error_while_evaluating_the_champion_fails_the_gate_and_moves_nothing(
    smear_dir: Path, mlflow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: a champion that cannot be evaluated for a transient reason stops the gate."""
    from leukemia import gate, promotion, registry, selection, tracking

    cache: dict = {}
    split = _train(smear_dir, mlflow_env, "adam", "manual__1", cache)["split"]
    experiment_id = tracking.setup()
    first = promotion.select_and_promote(experiment_id, split.path, smear_dir, "manual__1", OPEN)
    _train(smear_dir, mlflow_env, "sgd", "manual__2", cache)
    real = gate.evaluate_version

    def champion_unreachable(name: str, version: str, *args: object, **kwargs: object) -> object:
        if version == first["version"]:
            raise ConnectionError("artifact store unreachable")
        return real(name, version, *args, **kwargs)

    monkeypatch.setattr(gate, "evaluate_version", champion_unreachable)
    with pytest.raises(ConnectionError):
        promotion.select_and_promote(experiment_id, split.path, smear_dir, "manual__2", OPEN)
    candidate = registry.version_of_run(
        "leukemia-classifier", selection.finished_runs(experiment_id, "manual__2")[0].info.run_id
    )
    assert "gate" not in candidate.tags
    assert str(registry.current_champion().version) == first["version"]
    with pytest.raises(registry.ModelVerificationError, match="has not passed the promotion gate"):
        registry.move_champion(str(candidate.version), "promotion", "by hand", "someone", "test")


@pytest.mark.slow
def test_a_champion_whose_files_are_gone_is_replaced_without_a_comparison(
    smear_dir: Path, mlflow_env: Path
) -> None:
    import shutil

    import mlflow

    from leukemia import promotion, registry, tracking

    cache: dict = {}
    split = _train(smear_dir, mlflow_env, "adam", "manual__1", cache)["split"]
    experiment_id = tracking.setup()
    first = promotion.select_and_promote(experiment_id, split.path, smear_dir, "manual__1", OPEN)
    shutil.rmtree(
        mlflow.artifacts.download_artifacts(f"models:/leukemia-classifier/{first['version']}")
    )
    _train(smear_dir, mlflow_env, "sgd", "manual__2", cache)
    second = promotion.select_and_promote(experiment_id, split.path, smear_dir, "manual__2", OPEN)
    assert second["alias"] == "champion"
    assert "min_gain_over_champion: not applicable" in " ".join(second["checks"])
    version = registry.client().get_model_version("leukemia-classifier", second["version"])
    assert version.tags["gate.champion"].startswith(
        f"champion v{first['version']} cannot be loaded"
    )


@pytest.mark.slow
def test_the_gate_registers_the_run_it_is_given_not_the_best_one(
    smear_dir: Path, mlflow_env: Path
) -> None:
    """`register_and_gate` takes the run id from its upstream step (selection, or a refit that
    returns another run in the same dict shape): it never searches for the best run itself."""
    from leukemia import promotion, registry, runs, selection, tracking
    from leukemia.dataset import read_split, split_counts

    cache: dict = {}
    from leukemia.model import ModelConfig
    from leukemia.training import TrainConfig

    split = _train(smear_dir, mlflow_env, "adam", "manual__1", cache)["split"]
    cfg = TrainConfig(optimizer="sgd", model=ModelConfig(SIZE, "none"), **GATE_RUN)
    tags = {"airflow_run_id": "manual__1", "airflow_map_index": "1"}  # a second mapped task
    runs.train_run(cfg, split.path, smear_dir, cache["features"], tags, split.digest)
    experiment_id = tracking.setup()
    best = promotion.select_candidate(experiment_id, "manual__1")
    assert best["configurations"] == 2
    other = next(
        r.info.run_id
        for r in selection.finished_runs(experiment_id, "manual__1")
        if r.info.run_id != best["run_id"]
    )
    rows = read_split(split.path)
    info = {"path": split.path, "images_uri": str(smear_dir), "counts": split_counts(rows)}
    gated = promotion.register_and_gate(
        {"run_id": other, "selection": "refit of the best configuration"}, info, OPEN, "manual__1"
    )
    assert gated["run_id"] == other and registry.current_champion() is None  # no alias moved
    version = registry.client().get_model_version("leukemia-classifier", gated["version"])
    assert (
        version.run_id == other and version.tags["selection"] == "refit of the best configuration"
    )
    assert version.tags["gate"] == "passed" and version.aliases == []
