"""Evaluation with scikit-learn: the reference's metrics plus the clinician's first question.

Benign vs malignant: Early, Pre and Pro are malignant. Sensitivity is the share of malignant images
called malignant (any malignant class); specificity the share of benign images called benign.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leukemia.config import BENIGN, CLASSES


def clinical_rates(confusion: Any) -> dict[str, Any]:
    """`malignant_sensitivity` and `benign_specificity` of confusion matrices (..., 4, 4), rows true
    and columns predicted in `CLASSES` order: one value (an array for a stack of matrices) each, 0
    where no image of that kind is there. The one definition of the clinical pair: `evaluate`, the
    gate's MLflow metrics and its bootstrap intervals all call it."""
    import numpy as np

    m = np.asarray(confusion, dtype="float64")
    benign = CLASSES.index(BENIGN)
    malignant = [i for i in range(len(CLASSES)) if i != benign]
    called_malignant = m[..., malignant, :][..., malignant].sum(axis=(-2, -1))
    total_malignant = m[..., malignant, :].sum(axis=(-2, -1))
    total_benign = m[..., benign, :].sum(axis=-1)
    return {
        "malignant_sensitivity": _share(called_malignant, total_malignant),
        "benign_specificity": _share(m[..., benign, benign], total_benign),
    }


def _share(part: Any, whole: Any) -> Any:
    """part / whole, 0 where whole is 0 (scikit-learn's zero_division=0)."""
    import numpy as np

    part, whole = np.asarray(part, dtype="float64"), np.asarray(whole, dtype="float64")
    return np.divide(part, whole, out=np.zeros_like(part), where=whole > 0)


def evaluate(y_true: Any, probs: Any) -> dict[str, Any]:
    """Metrics dict (floats), the per-class report (text and dict) and the confusion matrix."""
    import numpy as np
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
    )

    y_true = np.asarray(y_true, dtype="int64")
    probs = np.asarray(probs, dtype="float64")
    y_pred = probs.argmax(axis=1)
    clipped = np.clip(probs, 1e-7, 1)
    labels = list(range(len(CLASSES)))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    clinical = clinical_rates(matrix)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "log_loss": float(
            log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True), labels=labels)
        ),
        **{k: float(v) for k, v in clinical.items()},
    }
    report_kwargs = {
        "labels": labels,
        "target_names": list(CLASSES),
        "zero_division": 0,
        "digits": 3,
    }
    return {
        "metrics": metrics,
        "report": classification_report(y_true, y_pred, **report_kwargs),
        "report_dict": classification_report(y_true, y_pred, output_dict=True, **report_kwargs),
        "confusion_matrix": matrix.tolist(),
        "y_pred": y_pred.tolist(),
        "confidence": probs.max(axis=1).tolist() if len(probs) else [],
    }


def predict_split(
    model: Any, split_path: str | Path, images_dir: str | Path, split: str = "test", batch: int = 32
) -> tuple[Any, Any]:
    """True class indices and predicted probabilities of a full model (raw pixels in) on one
    split's images, read in batches.

    `images_dir` is a folder or an `s3://` prefix: each image is read from there by its split path.
    """
    import numpy as np

    from leukemia.dataset import read_split
    from leukemia.features import iter_image_batches, labels_to_index
    from leukemia.objectstore import join

    size = int(model.input_shape[1])
    rows = [r for r in read_split(split_path) if r["split"] == split]
    if not rows:
        raise ValueError(f"{split_path} has no {split} images: make the split with more images")
    paths = [join(images_dir, r["path"]) for r in rows]
    probs = [model.predict_on_batch(x) for x in iter_image_batches(paths, size, batch)]
    return np.asarray(labels_to_index([r["label"] for r in rows])), np.concatenate(probs)
