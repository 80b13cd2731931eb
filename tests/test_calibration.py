"""Calibration: temperature scaling recovers a known temperature, ECE tells calibrated from
over-confident, conformal sets keep their coverage, referrals say why, the calibrated head is the
same numbers in stock layers (safe-mode loadable, Grad-CAM still explains it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukemia import calibration
from leukemia.calibration import (
    Calibration,
    brier_score,
    conformal_threshold,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    no_class_likely,
    prediction_set,
    referral,
    scale,
    set_metrics,
)
from leukemia.config import CLASSES

SIZE = 48


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, the probabilities they give and labels drawn from exactly those probabilities:
    a perfectly calibrated model, by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, len(CLASSES)))
    probs = _softmax(logits)
    labels = np.asarray([rng.choice(len(CLASSES), p=p) for p in probs])
    return logits, probs, labels


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece_and_nll() -> None:
    """An over-confident model: the calibrated logits multiplied by 3. The fitted T is 3 within
    5 % (20,000 images), and T lowers both the ECE and the NLL."""
    logits, _, labels = _calibrated(20_000, seed=0)
    sharp = _softmax(3.0 * logits)
    t = fit_temperature(sharp, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    scaled = scale(sharp, t)
    assert (
        expected_calibration_error(scaled, labels)
        < 0.02
        < expected_calibration_error(sharp, labels)
    )
    assert negative_log_likelihood(scaled, labels) < negative_log_likelihood(sharp, labels) - 0.1
    assert (scaled.argmax(axis=1) == sharp.argmax(axis=1)).all()  # T changes no prediction
    assert fit_temperature(np.zeros((0, 4)), np.zeros(0)) == 1.0  # nothing to fit


def test_ece_is_near_zero_when_calibrated_and_large_when_over_confident() -> None:
    """Tolerance: 0.02 on 20,000 calibrated images (the binned accuracy's sampling noise is below
    0.01 in every well-filled bin); the over-confident model (logits x 3) is off by more than
    0.1."""
    logits, probs, labels = _calibrated(20_000, seed=1)
    assert expected_calibration_error(probs, labels) < 0.02
    assert expected_calibration_error(_softmax(3.0 * logits), labels) > 0.1
    perfect = np.eye(len(CLASSES))[labels]
    assert expected_calibration_error(perfect, labels) == 0.0
    assert brier_score(perfect, labels) == 0.0
    assert brier_score(np.roll(perfect, 1, axis=1), labels) == pytest.approx(2.0)


def test_conformal_sets_cover_fresh_exchangeable_images_at_the_asked_coverage() -> None:
    """Split conformal on 1,000 calibration images, checked on 20,000 fresh ones from the same
    distribution. One calibration set's coverage is Beta-distributed with mean ≥ 0.9 and standard
    deviation about sqrt(0.9·0.1/1000) ≈ 0.0095, so the tolerance is 3 of them (0.03) on either
    side; the sets are not all four classes (that would cover trivially)."""
    _, cal_probs, cal_labels = _calibrated(1_000, seed=2)
    _, probs, labels = _calibrated(20_000, seed=3)
    for coverage in (0.8, 0.9, 0.95):
        q = conformal_threshold(cal_probs, cal_labels, coverage)
        sets = [prediction_set(p, q) for p in probs]
        covered = np.mean([CLASSES[y] in s for y, s in zip(labels, sets, strict=True)])
        assert coverage - 0.03 <= covered <= coverage + 0.03, (coverage, covered)
        assert np.mean([len(s) for s in sets]) < len(CLASSES) - 0.5
    metrics = calibration.set_metrics(
        probs, labels, conformal_threshold(cal_probs, cal_labels, 0.9)
    )
    assert metrics["coverage"] >= 0.87 and 0 < metrics["referral_rate"] < 1


def test_conformal_threshold_refers_everything_when_there_are_too_few_images() -> None:
    """n < coverage / (1 - coverage): 18 images cannot promise 0.95 (19 can)."""
    _, probs, labels = _calibrated(19, seed=4)
    assert conformal_threshold(probs[:18], labels[:18], 0.95) == 1.0
    assert conformal_threshold(probs[:0], labels[:0], 0.95) == 1.0
    assert conformal_threshold(probs, labels, 0.95) < 1.0
    assert set(prediction_set(probs[0], 1.0)) == set(CLASSES)  # threshold 1: every class
    with pytest.raises(ValueError, match="coverage must be in"):
        conformal_threshold(probs, labels, 1.0)


@pytest.mark.parametrize("threshold", [None, 0.0, 0.3, 0.7, 1.0])
def test_a_prediction_set_always_holds_the_predicted_class(threshold: float | None) -> None:
    _, probs, _ = _calibrated(500, seed=5)
    for p in probs:
        chosen = prediction_set(p, threshold)
        assert CLASSES[int(np.argmax(p))] in chosen
        assert list(chosen) == [c for c in CLASSES if c in chosen]  # in CLASSES order
        if threshold is None or threshold == 0.0:
            assert len(chosen) == 1  # no threshold (or q̂ 0): the argmax alone
    flat = (0.3, 0.3, 0.2, 0.2)
    assert prediction_set(flat, 0.8) == ("Benign", "Early", "Pre", "Pro")  # p ≥ 0.2
    assert prediction_set(flat, 0.71) == ("Benign", "Early")  # p ≥ 0.29
    assert prediction_set(flat, 0.69) == ("Benign",)  # p ≥ 0.31: none, the argmax still is


def test_referral_says_why_and_refers_a_single_class_only_for_an_external_reason() -> None:
    assert referral(("Pre",)) == (False, "")
    assert referral(("Benign", "Pre")) == (True, "benign or malignant Benign|Pre")
    assert referral(("Pre", "Pro")) == (True, "uncertain between Pre|Pro")
    assert referral(("Pre",), ["batch drifted", ""]) == (True, "batch drifted")
    assert referral(("Early", "Pre"), ["batch drifted"]) == (
        True,
        "uncertain between Early|Pre; batch drifted",
    )


def test_an_image_no_class_of_which_reaches_the_threshold_is_referred() -> None:
    """LAC's empty set: the model abstains. The set shown is the argmax, the image is referred."""
    flat = (0.3, 0.3, 0.2, 0.2)
    assert no_class_likely(flat, 0.69) and not no_class_likely(flat, 0.71)
    assert not no_class_likely(flat, None)  # no threshold: never
    assert referral(("Benign",), unsure=True) == (
        True,
        "no class likely enough (not even Benign)",
    )
    labels = np.asarray([0, 0])
    metrics = set_metrics(np.asarray([flat, (0.9, 0.05, 0.03, 0.02)]), labels, 0.2)
    assert metrics["referral_rate"] == 0.5 and metrics["mean_set_size"] == 1.0


def test_calibration_tags_round_trip_and_are_absent_before_calibration() -> None:
    logits, _, labels = _calibrated(400, seed=6)
    cal = Calibration.fit(_softmax(2.0 * logits), labels, 0.9, "cv")
    tags = cal.as_tags()
    assert all(k.startswith("calibration_") and isinstance(v, str) for k, v in tags.items())
    assert tags["calibration_source"] == "cv" and tags["calibration_images"] == "400"
    assert Calibration.from_tags({**tags, "other": "x"}) == cal  # exact: repr of floats
    assert cal.ece_after < cal.ece_before and cal.temperature == pytest.approx(2.0, rel=0.25)
    assert Calibration.from_tags({"config": "{}"}) is None  # a version registered before
    partial = {k: v for k, v in tags.items() if k != "calibration_threshold"}
    assert Calibration.from_tags(partial) is None


# --- the calibrated head in Keras -----------------------------------------------------------------


@pytest.fixture(scope="module")
def heads() -> dict:
    """An mlp head (random weights) and its calibrated copy at T = 2.5, with 16 feature rows."""
    import keras

    from leukemia.model import ModelConfig, build_head

    keras.utils.set_random_seed(0)
    cfg = ModelConfig(SIZE, "none")
    head = build_head(cfg)
    x = np.random.default_rng(7).normal(0, 3, size=(16, head.input_shape[-1])).astype("float32")
    return {"cfg": cfg, "head": head, "x": x, "T": 2.5}


def test_calibrated_head_gives_the_softmax_of_the_logits_divided_by_t(heads: dict) -> None:
    head, x, t = heads["head"], heads["x"], heads["T"]
    raw = np.asarray(head(x, training=False), dtype="float64")
    calibrated = calibration.calibrated_head(head, t)
    names = [layer.name for layer in calibrated.layers]
    assert names[-3:] == ["logits", "temperature", "probabilities"]
    got = np.asarray(calibrated(x, training=False), dtype="float64")
    np.testing.assert_allclose(got, scale(raw, t), atol=1e-5)
    assert (got.argmax(axis=1) == raw.argmax(axis=1)).all()
    assert got.max(axis=1).mean() < raw.max(axis=1).mean()  # T > 1: less sure
    # calibrating again re-scales the logits, it does not stack two temperatures
    again = calibration.calibrated_head(calibrated, 4.0)
    assert [layer.name for layer in again.layers].count("temperature") == 1
    np.testing.assert_allclose(np.asarray(again(x, training=False)), scale(raw, 4.0), atol=1e-5)


@pytest.mark.slow
def test_a_full_model_with_a_calibrated_head_loads_in_safe_mode_and_grad_cam_explains_it(
    heads: dict, tmp_path: Path
) -> None:
    import keras

    from leukemia.gradcam import GradCam
    from leukemia.model import assemble, build_trunk

    cfg, t = heads["cfg"], heads["T"]
    trunk = build_trunk(cfg)
    full = assemble(cfg, trunk, calibration.calibrated_head(heads["head"], t))
    pixels = np.random.default_rng(8).uniform(0, 255, size=(3, SIZE, SIZE, 3)).astype("float32")
    before = np.asarray(full.predict(pixels, verbose=0))
    full.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    after = np.asarray(loaded.predict(pixels, verbose=0))
    np.testing.assert_allclose(after, before, atol=1e-6)
    uncalibrated = assemble(cfg, trunk, heads["head"])  # the same weights: only T differs
    np.testing.assert_allclose(after, scale(uncalibrated.predict(pixels, verbose=0), t), atol=1e-5)
    heatmaps, probs = GradCam(loaded)(pixels)
    assert heatmaps.shape == (3, SIZE, SIZE)
    assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0 and heatmaps.max() <= 1
    np.testing.assert_allclose(probs, after, atol=1e-5)  # Grad-CAM's softmax includes T
