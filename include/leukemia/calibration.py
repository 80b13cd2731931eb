"""Probabilities that mean what they say, and prediction sets that refer what is uncertain.

Two steps, both fitted on held-out probabilities of the training images (the out-of-fold ones that
cross-validation produces for train + val, else the validation split's):

1. **Temperature scaling** (Guo et al. 2017): one scalar T > 0 divides the head's logits, fitted by
   minimising the negative log-likelihood. It changes no argmax, only how sure the softmax is. In
   the registered model it is two stock Keras layers after the head's last Dense (`calibrated_head`),
   so the model still loads in safe mode and Grad-CAM still sees the whole graph.
2. **Split-conformal prediction sets**, LAC score (Sadinle et al. 2019; the textbook recipe of
   Angelopoulos & Bates, "A gentle introduction to conformal prediction", §1): with scores
   s = 1 - p(true class) on n held-out images, q̂ is their ⌈(n+1)·coverage⌉/n empirical quantile,
   and an image's set is every class with p ≥ 1 - q̂. Then P(true class ∈ set) ≥ coverage on
   exchangeable images. LAC rather than APS: it gives the smallest sets on average, so the fewest
   referrals at a given coverage, which is what a laboratory pays for. Written out (twenty lines of
   numpy) rather than taken from `mapie`: the recipe needs no fitting API, and the threshold must
   travel as one number in the registered version's tags, which mapie's objects do not.

An image whose set holds more than one class (in particular Benign together with a malignant class)
is *referred* to a person, and so is an image whose LAC set is empty (no class reaches 1 - q̂: the
model abstains; the set shown then holds the predicted class alone), as is every image of a batch
with an external reason (a drifted batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from leukemia.config import BENIGN, CLASSES

#: Bins of the expected calibration error (equal width over the top-class confidence).
ECE_BINS = 15
#: Bounds of the fitted temperature (a softmax at T = 100 is flat; at 0.01 one-hot).
TEMPERATURE_BOUNDS = (0.01, 100.0)
#: Tag names under which a run and its registered version carry the calibration (`Calibration`).
TAG_PREFIX = "calibration_"
_EPS = 1e-7


def _arrays(probabilities: Any, labels: Any | None = None) -> tuple[Any, Any]:
    import numpy as np

    p = np.asarray(probabilities, dtype="float64")
    if p.ndim != 2 or p.shape[1] != len(CLASSES):
        raise ValueError(f"probabilities must be (n, {len(CLASSES)}), got {p.shape}")
    y = None if labels is None else np.asarray(labels, dtype="int64")
    if y is not None and len(y) != len(p):
        raise ValueError(f"{len(y)} labels for {len(p)} rows of probabilities")
    return p, y


def scale(probabilities: Any, temperature: float) -> Any:
    """softmax(log p / T): the probabilities a head with its logits divided by T gives."""
    import numpy as np

    p, _ = _arrays(probabilities)
    z = np.log(np.clip(p, _EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: Any, labels: Any) -> float:
    """Mean -log p(true class)."""
    import numpy as np

    p, y = _arrays(probabilities, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], _EPS, 1.0)).mean())


def fit_temperature(probabilities: Any, labels: Any) -> float:
    """The T that minimises the NLL of `scale(probabilities, T)` (1.0 when there is nothing to fit)."""
    from scipy.optimize import minimize_scalar

    p, y = _arrays(probabilities, labels)
    if len(y) == 0:
        return 1.0
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    best = minimize_scalar(
        lambda log_t: negative_log_likelihood(scale(p, math.exp(log_t)), y),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(best.x))


def expected_calibration_error(probabilities: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """Top-label ECE: Σ_b (n_b/n)·|accuracy_b - confidence_b| over equal-width confidence bins."""
    import numpy as np

    p, y = _arrays(probabilities, labels)
    if len(y) == 0:
        return 0.0
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype("float64")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def reliability(probabilities: Any, labels: Any, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: its range, images, mean confidence and accuracy (the reliability diagram)."""
    import numpy as np

    p, y = _arrays(probabilities, labels)
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype("float64")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "images": int((which == b).sum()),
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def brier_score(probabilities: Any, labels: Any) -> float:
    """Multi-class Brier score: mean over images of Σ_k (p_k - [k = true])²."""
    import numpy as np

    p, y = _arrays(probabilities, labels)
    if len(y) == 0:
        return 0.0
    onehot = np.eye(len(CLASSES))[y]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def conformal_threshold(probabilities: Any, labels: Any, coverage: float) -> float:
    """q̂ of the LAC score 1 - p(true class): the ⌈(n+1)·coverage⌉/n empirical quantile.

    1.0 (every class in every set: everything referred) when n is too small for the coverage asked
    (n < coverage / (1 - coverage), e.g. fewer than 19 images at 0.95): conformal sets cannot
    promise it with fewer, and saying "refer" is the honest answer.
    """
    import numpy as np

    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    p, y = _arrays(probabilities, labels)
    n = len(y)
    rank = math.ceil((n + 1) * coverage)
    if n == 0 or rank > n:
        return 1.0
    scores = np.sort(1.0 - p[np.arange(n), y])
    return float(scores[rank - 1])


def prediction_set(probabilities: Sequence[float], threshold: float | None) -> tuple[str, ...]:
    """Class names with p ≥ 1 - threshold, in `CLASSES` order; always with the predicted class.
    No threshold (a model registered before calibration): the predicted class alone."""
    top = max(range(len(CLASSES)), key=lambda k: probabilities[k])
    if threshold is None:
        return (CLASSES[top],)
    floor = 1.0 - threshold - 1e-12
    return tuple(c for k, c in enumerate(CLASSES) if probabilities[k] >= floor or k == top)


def no_class_likely(probabilities: Sequence[float], threshold: float | None) -> bool:
    """True when no class reaches p ≥ 1 - threshold: the LAC set is empty, the model abstains
    (the set shown still holds the predicted class). False without a threshold."""
    return threshold is not None and max(probabilities) < 1.0 - threshold - 1e-12


def set_label(classes: Sequence[str]) -> str:
    """`Pre|Pro`: the set as one CSV-safe string."""
    return "|".join(classes)


def referral(
    classes: Sequence[str], external: Sequence[str] = (), unsure: bool = False
) -> tuple[bool, str]:
    """(refer, reason): more than one class in the set, no class likely enough (`unsure`: the
    conformal set is empty, `no_class_likely`), or any external reason (e.g. a drifted batch);
    reasons joined with '; ', empty when not referred."""
    reasons = []
    if unsure:
        reasons.append(f"no class likely enough (not even {set_label(classes)})")
    elif len(classes) > 1:
        mixed = BENIGN in classes
        kind = "benign or malignant" if mixed else "uncertain between"
        reasons.append(f"{kind} {set_label(classes)}")
    reasons += [r for r in external if r]
    return bool(reasons), "; ".join(reasons)


def set_metrics(probabilities: Any, labels: Any, threshold: float | None) -> dict[str, float]:
    """Coverage, referral rate and mean set size of the sets, and the clinical pair among the
    images *not* referred (with the count of malignant images called benign without referral)."""
    import numpy as np

    from leukemia.evaluation import clinical_rates

    p, y = _arrays(probabilities, labels)
    sets = [prediction_set(row, threshold) for row in p]
    covered = [CLASSES[t] in s for t, s in zip(y, sets, strict=True)]
    referred = np.asarray(
        [len(s) > 1 or no_class_likely(row, threshold) for s, row in zip(sets, p, strict=True)],
        dtype=bool,
    )
    kept = ~referred
    confusion = np.zeros((len(CLASSES), len(CLASSES)))
    for t, k in zip(y[kept], p[kept].argmax(axis=1), strict=True):
        confusion[t, k] += 1
    rates = clinical_rates(confusion)
    benign = CLASSES.index(BENIGN)
    missed = int(((y != benign) & (p.argmax(axis=1) == benign) & kept).sum())
    n = max(len(y), 1)
    return {
        "coverage": float(np.mean(covered)) if len(y) else 0.0,
        "referral_rate": float(referred.sum() / n),
        "mean_set_size": float(np.mean([len(s) for s in sets])) if len(y) else 0.0,
        "unreferred_malignant_sensitivity": float(rates["malignant_sensitivity"]),
        "unreferred_benign_specificity": float(rates["benign_specificity"]),
        "malignant_called_benign_unreferred": float(missed),
    }


@dataclass(frozen=True)
class Calibration:
    """A run's calibration: the temperature inside its model and the conformal threshold beside it,
    fitted on `images` held-out images (`source`: `cv` out-of-fold, or `val`)."""

    temperature: float
    threshold: float
    coverage: float
    images: int
    source: str
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float

    @classmethod
    def fit(cls, probabilities: Any, labels: Any, coverage: float, source: str) -> Calibration:
        """Temperature by NLL, then the conformal threshold on the scaled probabilities."""
        temperature = fit_temperature(probabilities, labels)
        scaled = scale(probabilities, temperature)
        return cls(
            temperature=temperature,
            threshold=conformal_threshold(scaled, labels, coverage),
            coverage=coverage,
            images=len(scaled),
            source=source,
            ece_before=expected_calibration_error(probabilities, labels),
            ece_after=expected_calibration_error(scaled, labels),
            brier_before=brier_score(probabilities, labels),
            brier_after=brier_score(scaled, labels),
        )

    def as_tags(self) -> dict[str, str]:
        """`calibration_<field>` tags (run and registered version)."""
        return {f"{TAG_PREFIX}{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Calibration | None:
        """The calibration a run or version carries; None when it has none (registered before)."""
        try:
            values = {k: tags[f"{TAG_PREFIX}{k}"] for k in cls.__dataclass_fields__}
        except KeyError:
            return None
        types = {"images": int, "source": str}
        return cls(**{k: types.get(k, float)(v) for k, v in values.items()})


def calibrated_head(head: Any, temperature: float) -> Any:
    """The head with its softmax divided by `temperature`: the last Dense becomes `logits` (same
    weights, linear), then `Rescaling(1/T)` (`temperature`) and `Activation("softmax")`
    (`probabilities`): stock layers, so the model saves and loads in safe mode. A head that is
    already calibrated is re-scaled, not wrapped twice."""
    import keras

    layers = {layer.name: layer for layer in head.layers}
    if "temperature" in layers:  # calibrated before: rebuild from its logits
        logits = layers["logits"].output
    else:
        last = layers["probabilities"]
        dense = keras.layers.Dense(
            last.units,
            activation=None,
            kernel_regularizer=last.kernel_regularizer,
            name="logits",
        )
        logits = dense(last.input)
        dense.set_weights(last.get_weights())
    scaled = keras.layers.Rescaling(1.0 / temperature, name="temperature")(logits)
    outputs = keras.layers.Activation("softmax", name="probabilities")(scaled)
    return keras.Model(head.inputs, outputs, name=head.name)
