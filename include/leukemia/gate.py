"""The promotion gate: the candidate and the champion measured on the same test split, and the
decision taken by MLflow on clinical thresholds.

- **Measured with MLflow.** Each model version is loaded the verified way, as scoring serves it
  (`predict.ServedModel`: on the int8 copy of its trunk when its head was trained on int8 features),
  its test-split predictions go to `mlflow.models.evaluate(..., model_type="classifier")` as a
  static table (so MLflow never loads the model itself, which would skip the sha256 check), with
  the clinical metrics as `extra_metrics` built on scikit-learn. Each evaluation is an MLflow run
  (`kind=evaluation`) holding MLflow's confusion matrix, per-class metrics and the intervals.
- **Decided by MLflow.** Each threshold is one `mlflow.validate_evaluation_results` call, so each
  failure is one line: minimum macro-F1, minimum malignant sensitivity (Early+Pre+Pro vs Benign),
  minimum benign specificity, the minimum gain in macro-F1 over the champion, and the maximum
  expected calibration error of the candidate's calibrated test probabilities (`test_ece`, logged
  by its training run: `calibration.py`); a candidate without it (trained before calibration) is
  "not measured", which does not block.
- **Fails closed.** An error while reading or evaluating the champion is raised (the task retries
  and nothing is promoted); only a champion whose files are gone or fail verification is skipped,
  because it can never serve again. Without a champion the gain check does not apply: the
  absolute thresholds alone decide whether a first champion may go live.
- **95 % intervals** come from a stratified bootstrap: each resample draws every class's test
  images with replacement, so its confusion-matrix row of class c is a multinomial draw of n_c
  from the observed row. The 1,000 resamples are drawn at once that way; the metrics of a
  confusion matrix are then a few array operations (`matrix_metrics`, checked against
  scikit-learn in the tests), where 1,000 calls of scikit-learn's functions take ~15 s a model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES, RUN_DEFAULTS

log = logging.getLogger(__name__)

#: Confidence level and resamples of the bootstrap intervals; the seed makes them repeatable.
CONFIDENCE, RESAMPLES, SEED = 0.95, 1000, 0

#: The metrics a card and a review show, by MLflow's name: what each means to a reader.
REPORTED: dict[str, str] = {
    "accuracy_score": "accuracy",
    "f1_score": "macro-F1",
    **{f"recall_{c}": f"recall {c}" for c in CLASSES},
    "malignant_sensitivity": "malignant sensitivity",
    "benign_specificity": "benign specificity",
}


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must reach to become champion.

    Production reads them from the deployment's policy (`policy.Policy.from_env().thresholds()`,
    tightened by a run's Params); these defaults are the policy's documented defaults.
    """

    min_f1_macro: float = RUN_DEFAULTS.min_f1_macro
    min_malignant_sensitivity: float = RUN_DEFAULTS.min_malignant_sensitivity
    min_benign_specificity: float = RUN_DEFAULTS.min_benign_specificity
    min_gain_over_champion: float = RUN_DEFAULTS.promotion_margin
    max_test_ece: float = RUN_DEFAULTS.max_test_ece

    @classmethod
    def of(cls, settings: Any) -> Thresholds:
        """The thresholds of anything that holds the policy's five settings (a `policy.Policy`,
        a `RunRequest`): `promotion_margin` is the gain over the champion."""
        return cls(
            settings.min_f1_macro,
            settings.min_malignant_sensitivity,
            settings.min_benign_specificity,
            settings.promotion_margin,
            settings.max_test_ece,
        )


#: Each check: the threshold's field in `Thresholds`, the MLflow metric it reads, its words.
CHECKS: tuple[tuple[str, str, str], ...] = (
    ("min_f1_macro", "f1_score", "macro-F1"),
    ("min_malignant_sensitivity", "malignant_sensitivity", "malignant sensitivity"),
    ("min_benign_specificity", "benign_specificity", "benign specificity"),
    ("min_gain_over_champion", "f1_score", "macro-F1 gain over the champion"),
    ("max_test_ece", "test_ece", "test ECE"),
)
GAIN_CHECK = "min_gain_over_champion"
#: The check of an upper bound: the training run's ECE on the test split (a run metric, not one
#: MLflow's evaluation computes), passed to the gate with the candidate's metrics.
ECE_CHECK, ECE_METRIC = "max_test_ece", "test_ece"
PASSED, FAILED, NOT_APPLICABLE = "passed", "failed", "not applicable"
NOT_MEASURED = "not measured"


@dataclass
class Check:
    """One threshold's outcome, with its one-line explanation."""

    name: str
    status: str
    line: str


@dataclass
class Evaluation:
    """One model version measured on the test split (small: fits in XCom)."""

    version: str
    run_id: str
    metrics: dict[str, float]
    intervals: dict[str, list[float]]
    confusion_matrix: list[list[int]]
    examples: int
    url: str = ""


@dataclass
class GateResult:
    """What the gate measured and decided for one candidate (small: fits in XCom)."""

    name: str
    version: str
    run_id: str
    passed: bool
    checks: list[Check]
    candidate: Evaluation
    champion: Evaluation | None
    champion_note: str
    thresholds: dict[str, float]
    selection: str
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        """One line per failed threshold."""
        return [c.line for c in self.checks if c.status == FAILED]


# --- metrics ---------------------------------------------------------------------------------------


def extra_metrics() -> list[Any]:
    """MLflow metrics beside the built-in ones: per-class recall and the clinical pair.

    Benign specificity (benign images called benign) is the recall of Benign; malignant sensitivity
    is the recall of "malignant" when Early, Pre and Pro are pooled (`evaluation.clinical_rates`).
    """
    from mlflow.models import make_metric
    from sklearn.metrics import confusion_matrix, recall_score

    from leukemia.evaluation import clinical_rates

    def per_class(label: str) -> Any:
        def recall(predictions: Any, targets: Any, metrics: Any) -> float:
            return float(
                recall_score(targets, predictions, labels=[label], average="macro", zero_division=0)
            )

        return make_metric(eval_fn=recall, greater_is_better=True, name=f"recall_{label}")

    def clinical(name: str) -> Any:
        def rate(predictions: Any, targets: Any, metrics: Any) -> float:
            matrix = confusion_matrix(targets, predictions, labels=list(CLASSES))
            return float(clinical_rates(matrix)[name])

        return make_metric(eval_fn=rate, greater_is_better=True, name=name)

    return [
        *(per_class(c) for c in CLASSES),
        clinical("malignant_sensitivity"),
        clinical("benign_specificity"),
    ]


def matrix_metrics(matrices: Any) -> dict[str, Any]:
    """The reported metrics of confusion matrices (..., 4, 4), rows true and columns predicted in
    `CLASSES` order: one array of values per metric, as scikit-learn defines them with
    zero_division=0 (macro-F1 over the classes that occur, as MLflow's `f1_score`)."""
    import numpy as np

    from leukemia.evaluation import clinical_rates

    m = np.asarray(matrices, dtype="float64")
    diag = np.diagonal(m, axis1=-2, axis2=-1)
    true, pred = m.sum(axis=-1), m.sum(axis=-2)
    recall = np.divide(diag, true, out=np.zeros_like(diag), where=true > 0)
    occurs = (true + pred) > 0
    f1 = np.divide(2 * diag, true + pred, out=np.zeros_like(diag), where=occurs)
    macro_f1 = f1.sum(axis=-1) / np.maximum(occurs.sum(axis=-1), 1)
    return {
        "accuracy_score": diag.sum(axis=-1) / np.maximum(m.sum(axis=(-2, -1)), 1),
        "f1_score": macro_f1,
        **{f"recall_{c}": recall[..., i] for i, c in enumerate(CLASSES)},
        **clinical_rates(m),
    }


def bootstrap_intervals(
    confusion: Any, resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, list[float]]:
    """95 % percentile intervals of the reported metrics, by stratified bootstrap (module docstring)."""
    import numpy as np

    counts = np.asarray(confusion, dtype="int64")
    rng = np.random.default_rng(seed)
    draws = np.zeros((resamples, *counts.shape), dtype="int64")
    for i, row in enumerate(counts):
        if row.sum():
            draws[:, i, :] = rng.multinomial(row.sum(), row / row.sum(), size=resamples)
    tail = (1 - CONFIDENCE) / 2 * 100
    return {
        name: [float(v) for v in np.percentile(values, [tail, 100 - tail])]
        for name, values in matrix_metrics(draws).items()
    }


# --- evaluating one version ----------------------------------------------------------------------


def evaluate_version(
    name: str,
    version: str,
    split_path: str | Path,
    images_dir: str | Path,
    experiment_id: str,
    run_name: str,
    tags: dict[str, str] | None = None,
) -> tuple[Evaluation, Any]:
    """Measure one registered version on the test split as an MLflow evaluation run.

    Returns the evaluation and MLflow's `EvaluationResult` (what `validate_evaluation_results`
    reads). The model is loaded as scoring loads it (`predict.ServedModel`), only after its file
    matched the recorded sha256.
    """
    import mlflow
    import numpy as np
    import pandas as pd
    from sklearn.metrics import confusion_matrix

    from leukemia import registry, tracking
    from leukemia.evaluation import predict_split
    from leukemia.predict import ServedModel

    # as serving computes it (`predict.ServedModel`, sha256-verified): on the int8 copy of the
    # trunk when the version's head was trained on int8 features
    model = ServedModel.of(registry.version_ref(name, version))
    y_true, probs = predict_split(model, split_path, images_dir)
    labels = np.asarray(CLASSES)
    frame = pd.DataFrame({"label": labels[y_true], "prediction": labels[probs.argmax(axis=1)]})
    matrix = confusion_matrix(frame["label"], frame["prediction"], labels=list(CLASSES))
    run_tags = {
        "kind": tracking.RunKind.EVALUATION.value,
        "model_name": name,
        "model_version": str(version),
    }
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags={**run_tags, **(tags or {})}
    ) as run:
        result = mlflow.models.evaluate(
            data=frame,
            targets="label",
            predictions="prediction",
            model_type="classifier",
            evaluator_config={
                "label_list": list(CLASSES),
                "average": "macro",
                "log_model_explainability": False,
                "log_metrics_with_dataset_info": False,
            },
            extra_metrics=extra_metrics(),
        )
        intervals = bootstrap_intervals(matrix)
        mlflow.log_metrics(
            {f"{k}_ci_low": v[0] for k, v in intervals.items()}
            | {f"{k}_ci_high": v[1] for k, v in intervals.items()}
        )
        mlflow.log_dict(
            {"confusion_matrix": matrix.tolist(), "intervals": intervals}, "intervals.json"
        )
    evaluation = Evaluation(
        version=str(version),
        run_id=run.info.run_id,
        metrics={k: float(v) for k, v in result.metrics.items()},
        intervals=intervals,
        confusion_matrix=matrix.tolist(),
        examples=len(frame),
        url=tracking.run_url(experiment_id, run.info.run_id),
    )
    return evaluation, result


# --- the decision --------------------------------------------------------------------------------


def check_thresholds(
    thresholds: Thresholds,
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    champion_version: str = "",
) -> list[Check]:
    """Each threshold checked by `mlflow.validate_evaluation_results`, one call per threshold.

    `candidate` and `champion` are MLflow evaluation metrics (`f1_score`, `malignant_sensitivity`,
    …), the candidate's with its run's `test_ece`. Without a champion the gain check does not
    apply; without `test_ece` (a model trained before calibration) the ECE check is not measured.
    Neither blocks.
    """
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    cand = EvaluationResult(metrics=dict(candidate), artifacts={})
    base = EvaluationResult(metrics=dict(champion), artifacts={}) if champion is not None else None
    checks = []
    for check, metric, words in CHECKS:
        limit = float(getattr(thresholds, check))
        value = candidate.get(metric, float("nan"))
        if check == GAIN_CHECK:
            if champion is None:
                checks.append(Check(check, NOT_APPLICABLE, f"{check}: not applicable: no champion"))
                continue
            # MLflow wants a positive absolute change; a zero margin means "not worse", which is
            # a relative change of at least 0
            rule = (
                MetricThreshold(min_absolute_change=limit, greater_is_better=True)
                if limit > 0
                else MetricThreshold(min_relative_change=0.0, greater_is_better=True)
            )
            old = champion.get(metric, float("nan"))
            text = f"macro-F1 {value:.4f} vs champion v{champion_version} {old:.4f} + {limit:g}"
        elif check == ECE_CHECK:
            if metric not in candidate:
                checks.append(
                    Check(
                        check,
                        NOT_MEASURED,
                        f"{check}: {NOT_MEASURED}: the candidate's run logged no test ECE "
                        "(trained before calibration)",
                    )
                )
                continue
            rule = MetricThreshold(threshold=limit, greater_is_better=False)
            text = f"{words} {value:.4f} vs maximum {limit:g}"
        else:
            rule = MetricThreshold(threshold=limit, greater_is_better=True)
            text = f"{words} {value:.4f} vs minimum {limit:g}"
        try:
            # the champion's evaluation has no test_ece (a run metric): an absolute check needs none
            mlflow.validate_evaluation_results(
                {metric: rule}, cand, None if check == ECE_CHECK else base
            )
        except ModelValidationFailedException:
            checks.append(Check(check, FAILED, f"{check}: failed: {text}"))
        else:
            checks.append(Check(check, PASSED, f"{check}: passed: {text}"))
    return checks


def version_tags(result: GateResult) -> dict[str, str]:
    """The gate's record on the version: `gate` (passed/failed) and one `gate.<check>` each."""
    return {
        "gate": PASSED if result.passed else FAILED,
        **{f"gate.{c.name}": c.line.split(": ", 1)[1] for c in result.checks},
        "gate.champion": result.champion_note,
        "gate.evaluation_run_id": result.candidate.run_id,
    }


def run_gate(
    candidate: Any,
    split_path: str | Path,
    images_dir: str | Path,
    thresholds: Thresholds,
    provenance: dict[str, Any] | None = None,
    airflow_run_id: str | None = None,
) -> GateResult:
    """Evaluate a registered candidate and the current champion on the same test split, check
    the thresholds, and record the outcome on the version (tags, and `gate.json` on the
    candidate's evaluation run, which the model card is made from).

    `candidate` is a `registry.Candidate`. Never moves an alias. Fails closed (module docstring).
    """
    import mlflow

    from leukemia import registry
    from leukemia.errors import first_line

    name, version = candidate.name, candidate.version
    tags = {"airflow_run_id": airflow_run_id} if airflow_run_id else {}
    args = (split_path, images_dir, candidate.experiment_id)
    new, new_result = evaluate_version(name, version, *args, f"evaluate-v{version}", tags)
    champion = registry.current_champion(name)  # fails closed
    old = old_result = None
    if champion is None:
        note = "no champion yet: the absolute thresholds alone decide"
    elif str(champion.version) == version:
        note = f"v{version} is already the champion"
    else:
        number = str(champion.version)
        try:
            old, old_result = evaluate_version(
                name, number, *args, f"evaluate-v{number}-for-v{version}", tags
            )
        except Exception as exc:
            if not registry.cannot_serve(exc):
                raise
            note = f"champion v{number} cannot be loaded ({first_line(exc)}): no comparison"
            log.warning("Champion %s v%s cannot serve: %s", name, number, first_line(exc))
        else:
            note = f"champion v{number} re-evaluated on the same test split"
    measured = dict(new_result.metrics)
    if ECE_METRIC in candidate.metrics:  # the training run's, on its calibrated test probabilities
        measured[ECE_METRIC] = float(candidate.metrics[ECE_METRIC])
    checks = check_thresholds(
        thresholds,
        measured,
        old_result.metrics if old_result is not None else None,
        old.version if old is not None else "",
    )
    result = GateResult(
        name=name,
        version=version,
        run_id=candidate.run_id,
        passed=all(c.status != FAILED for c in checks),
        checks=checks,
        candidate=new,
        champion=old,
        champion_note=note,
        thresholds=asdict(thresholds),
        selection=candidate.selection,
        provenance=provenance or {},
    )
    mlflow.MlflowClient().log_dict(new.run_id, to_dict(result), "gate.json")
    registry.tag_version(name, version, version_tags(result))
    for line in [c.line for c in checks]:
        log.info("Gate for %s v%s: %s", name, version, line)
    return result


def to_dict(result: GateResult) -> dict[str, Any]:
    """Plain values for XCom and `gate.json`, with the failures spelled out."""
    return {**asdict(result), "failures": result.failures}
