"""Evaluation: macro metrics, confusion matrix and the benign-vs-malignant question."""

from __future__ import annotations

import numpy as np
import pytest

from leukemia.evaluation import evaluate


def _onehot(pred: list[int], confidence: float = 0.9) -> np.ndarray:
    probs = np.full((len(pred), 4), (1 - confidence) / 3)
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def test_perfect_predictions() -> None:
    y = [0, 1, 2, 3, 0, 1]
    out = evaluate(y, _onehot(y))
    m = out["metrics"]
    assert m["accuracy"] == m["f1_macro"] == m["precision_macro"] == m["recall_macro"] == 1.0
    assert m["malignant_sensitivity"] == m["benign_specificity"] == 1.0
    assert out["confusion_matrix"] == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert out["confidence"] == pytest.approx([0.9] * 6)


def test_benign_vs_malignant() -> None:
    # 4 benign (one called Pre), 6 malignant (one Early called Benign, one Pre called Pro)
    y_true = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    y_pred = [0, 0, 0, 2, 0, 1, 3, 2, 3, 3]
    m = evaluate(y_true, _onehot(y_pred))["metrics"]
    assert m["malignant_sensitivity"] == pytest.approx(
        5 / 6
    )  # a malignant→malignant mix-up still counts
    assert m["benign_specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(7 / 10)


def test_report_lists_every_class_even_when_absent() -> None:
    out = evaluate([0, 1], _onehot([0, 1]))
    for name in ("Benign", "Early", "Pre", "Pro"):
        assert name in out["report"]
    assert out["report_dict"]["Pro"]["support"] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_the_clinical_pair_is_one_definition_every_caller_agrees_on(seed: int) -> None:
    """`evaluate`, the gate's MLflow metrics and its bootstrap all call `clinical_rates`: the same
    predictions give the same sensitivity and specificity everywhere (seed 1: no malignant image,
    the sensitivity is 0, not a division by zero)."""
    import pandas as pd
    from sklearn.metrics import confusion_matrix

    from leukemia.config import CLASSES
    from leukemia.evaluation import clinical_rates
    from leukemia.gate import extra_metrics, matrix_metrics

    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, 80) if seed == 0 else np.zeros(80, dtype="int64")
    y_pred = np.where(rng.random(80) < 0.3, rng.integers(0, 4, 80), y_true)
    malignant, called = y_true != 0, y_pred != 0
    expected = {
        "malignant_sensitivity": (malignant & called).sum() / max(malignant.sum(), 1),
        "benign_specificity": (~malignant & ~called).sum() / max((~malignant).sum(), 1),
    }
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(4)))
    names = np.asarray(CLASSES)
    by_mlflow = {
        m.name: m.eval_fn(pd.Series(names[y_pred]), pd.Series(names[y_true]), {})
        for m in extra_metrics()
    }
    metrics = evaluate(y_true, _onehot(y_pred.tolist()))["metrics"]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value)
        assert by_mlflow[name] == pytest.approx(value)
        assert float(matrix_metrics(matrix)[name]) == pytest.approx(value)
        assert float(clinical_rates(matrix)[name]) == pytest.approx(value)
