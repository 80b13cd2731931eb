"""The drift watch on synthetic features with structure: a low-rank signal, four class means and
noise, like pooled CNN features. Seeded; margins sized so that a test fails only when the behaviour
does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukemia.drift import (
    DRIFT,
    NO_DRIFT,
    Reference,
    batch_drift,
    ood_flags,
    ood_scores,
)

WIDTH = 64
RANK = 8


def make_world(seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed structure of one synthetic feature distribution."""
    rng = np.random.default_rng(seed)
    return {
        "basis": rng.normal(size=(RANK, WIDTH)),
        "class_means": rng.normal(scale=1.5, size=(4, RANK)),
        "offset": rng.uniform(2, 5, size=WIDTH),
    }


def draw(
    world: dict[str, np.ndarray], n: int, seed: int, scale: float = 1.0, shift: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """n feature vectors and their classes; `scale` widens the latent spread about the class
    means, `shift` moves every feature by that many noise standard deviations along one fixed
    random direction."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    latent = world["class_means"][labels] + scale * rng.normal(size=(n, RANK))
    x = world["offset"] + latent @ world["basis"] + rng.normal(scale=0.5, size=(n, WIDTH))
    if shift:
        direction = np.random.default_rng(99).normal(size=WIDTH)
        x = x + shift * 0.5 * direction / np.linalg.norm(direction) * np.sqrt(WIDTH)
    return x.astype("float32"), labels


@pytest.fixture(scope="module")
def world() -> dict[str, np.ndarray]:
    return make_world()


@pytest.fixture(scope="module")
def reference(world: dict[str, np.ndarray]) -> Reference:
    return Reference.fit(*draw(world, 1500, seed=1), sample=500, fpr=0.01, seed=0)


def test_unshifted_batch_is_not_flagged(world: dict, reference: Reference) -> None:
    result = batch_drift(reference, draw(world, 50, seed=2)[0])
    assert result.decision == NO_DRIFT and not result.drifted
    assert result.p_value > 0.05
    assert 0.35 < result.statistic < 0.65
    assert (result.n, result.n_reference, result.folds, result.permutations) == (50, 500, 5, 500)


def test_mean_shifted_batch_is_flagged(world: dict, reference: Reference) -> None:
    # every feature moved by 0.3 noise sd on average: invisible image by image, plain in a batch
    x = draw(world, 50, seed=3, shift=0.3)[0]
    result = batch_drift(reference, x)
    assert result.decision == DRIFT and result.drifted
    assert result.p_value <= 1 / 501 + 1e-12
    assert result.statistic > 0.7
    assert ood_flags(reference, x).mean() < 0.2  # the per-image score alone would not say so


def test_scale_shifted_batch_with_the_same_mean_is_flagged(world: dict, reference: Reference):
    x = draw(world, 50, seed=4, scale=1.6)[0]
    assert batch_drift(reference, x).drifted
    # the spread features are what see it: a linear classifier on the features alone does not
    assert not batch_drift(reference, x, spread=False).drifted


def test_p_values_are_uniform_under_the_null(world: dict, reference: Reference) -> None:
    """100 unshifted batches; 4× reference and 200 permutations keep it fast (the test is exact
    for any ratio and number of permutations)."""
    from scipy.stats import kstest

    p = np.array(
        [
            batch_drift(
                reference, draw(world, 30, seed=100 + i)[0], ratio=4, permutations=200, seed=i
            ).p_value
            for i in range(100)
        ]
    )
    assert np.mean(p <= 0.01) <= 0.04  # expected 0.01; 4 or more of 100: probability 0.02
    assert np.mean(p <= 0.05) <= 0.12  # expected 0.05; 12 or more: probability 0.005
    assert kstest(p, "uniform").pvalue > 0.01
    assert 0.4 < p.mean() < 0.6


def test_single_class_batch_is_drift_unless_the_reference_matches_its_classes(
    world: dict, reference: Reference
) -> None:
    x, labels = draw(world, 400, seed=11)
    one_class, classes = x[labels == 2][:40], labels[labels == 2][:40]
    assert batch_drift(reference, one_class).drifted  # a class-prior shift, seen as drift
    matched = batch_drift(reference, one_class, classes=classes)
    assert not matched.drifted and matched.class_matched
    assert set(reference.sample_labels[np.isin(reference.sample_labels, [2])]) == {2}
    assert matched.n_reference == min(400, (reference.sample_labels == 2).sum())
    assert "class-matched training features" in matched.summary()
    mixed = batch_drift(reference, x[:50], classes=labels[:50])
    assert not mixed.drifted and mixed.n_reference <= 500


def test_small_batch_gets_no_decision_but_ood_scores(world: dict, reference: Reference) -> None:
    x = draw(world, 19, seed=5)[0]
    result = batch_drift(reference, x, min_batch=20)
    assert result.decision == "too few images (n < 20): no decision"
    assert result.statistic is None and result.p_value is None and not result.drifted
    assert result.summary() == "drift watch: too few images (n < 20): no decision (19 images)"
    assert ood_scores(reference, x).shape == (19,)
    assert batch_drift(reference, draw(world, 20, seed=5)[0], min_batch=20).p_value is not None


def test_summary_is_one_line_with_the_numbers(world: dict, reference: Reference) -> None:
    line = batch_drift(reference, draw(world, 50, seed=3, shift=0.3)[0]).summary()
    assert "\n" not in line
    assert line.startswith("drift watch: drift: AUC ")
    assert "p 0.0020 (alpha 0.01; 50 images vs 500 training features, 5-fold" in line


@pytest.mark.parametrize(("fpr", "tolerance"), [(0.01, 0.012), (0.05, 0.025)])
def test_ood_threshold_holds_its_false_positive_rate_on_fresh_data(
    world: dict, fpr: float, tolerance: float
) -> None:
    ref = Reference.fit(*draw(world, 2000, seed=6), fpr=fpr, seed=1)
    fresh = draw(world, 4000, seed=7)[0]
    assert abs(ood_flags(ref, fresh).mean() - fpr) <= tolerance


def test_ood_flags_far_away_points(world: dict, reference: Reference) -> None:
    far = draw(world, 100, seed=8, shift=3.0)[0]
    wide = draw(world, 100, seed=9, scale=8.0)[0]
    assert ood_flags(reference, far).mean() == 1.0
    assert ood_flags(reference, wide).mean() > 0.9
    assert ood_scores(reference, far).min() > 2 * reference.threshold


def test_reference_round_trips_through_one_npz(
    world: dict, reference: Reference, tmp_path: Path
) -> None:
    size = reference.save(tmp_path / "reference.npz")
    loaded = Reference.load(tmp_path / "reference.npz")
    assert size == (tmp_path / "reference.npz").stat().st_size
    assert loaded.sample.dtype == np.float16 and loaded.sample.shape == (500, WIDTH)
    assert (loaded.threshold, loaded.fpr, loaded.n_train) == (reference.threshold, 0.01, 1500)
    x = draw(world, 30, seed=10, shift=0.3)[0]
    np.testing.assert_array_equal(ood_scores(loaded, x), ood_scores(reference, x))
    assert Reference.from_bytes(reference.to_bytes()).threshold == reference.threshold
    before, after = batch_drift(reference, x).as_dict(), batch_drift(loaded, x).as_dict()
    assert {**before, "seconds": 0} == {**after, "seconds": 0}


def test_reference_of_500_multiscale_vectors_has_the_stated_size(tmp_path: Path) -> None:
    from leukemia.model import feature_width

    width = feature_width("multiscale")
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(600, width))).astype("float32")
    ref = Reference.fit(x, rng.integers(0, 4, 600), sample=500)
    assert ref.save(tmp_path / "r.npz") == 2_925_788  # as the Reference docstring states


def test_reference_load_refuses_another_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", sample=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not a drift reference"):
        Reference.load(tmp_path / "other.npz")


def test_features_of_another_width_are_refused(reference: Reference) -> None:
    with pytest.raises(ValueError, match=r"features must be \(n, 64\)"):
        batch_drift(reference, np.zeros((30, 65)))
