"""Training the head on cached features: it learns, all optimizers train, it is seeded.

The statistical tests hold on any x86-64 CPU (oneDNN picks other kernels with and without AVX-512):
about 120 held-out images, a learning bar far below what the head reaches (0.97-1.0 measured) and far
above chance, and a shuffled-label bar derived from the sample size.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from leukemia.dataset import make_split, read_split
from leukemia.features import extract_features
from leukemia.model import ModelConfig
from leukemia.training import TrainConfig, fit_head, grid, split_arrays

SIZE = 48
PER_CLASS = 100
LEARNED = 0.85  # a head that learns reaches 0.97-1.0 here; one that does not, about 0.25
pytestmark = pytest.mark.slow


def chance_bound(n: int, classes: int = 4, sigmas: float = 4.0) -> float:
    """Highest accuracy a head without information reaches on n images, but once in ~30,000."""
    p = 1 / classes
    return p + sigmas * (p * (1 - p) / n) ** 0.5


@pytest.fixture(scope="module")
def learn_set(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Synthetic smears (48 px), a split and cached features from a randomly initialised VGG16."""
    from leukemia.dev.synthetic import generate

    root = tmp_path_factory.mktemp("learn")
    generate(root / "images", n_per_class=PER_CLASS, size=SIZE, seed=11)
    info = make_split(root / "images", root / "splits", fractions=(0.5, 0.2, 0.3))
    rows = read_split(info.path)
    cfg = ModelConfig(input_size=SIZE, weights="none")
    ex = extract_features(
        [root / "images" / r["path"] for r in rows],
        [r["sha256"] for r in rows],
        cfg,
        root / "features",
        precision="float32",
    )
    return {"rows": rows, "cache": ex.cache_dir, "root": root, "split": info}


def _accuracy(head, x, y) -> float:
    return float((head.predict(x, verbose=0).argmax(1) == y).mean())


@pytest.mark.parametrize("variant", ["multiscale", "seed"])
def test_head_learns_synthetic_classes(learn_set: dict, variant: str) -> None:
    data = split_arrays(learn_set["rows"], learn_set["cache"], variant)
    cfg = TrainConfig(
        optimizer="adam",
        batch_size=16,
        epochs=100,
        patience=20,
        model=ModelConfig(SIZE, "none", variant),
    )
    head, history = fit_head(cfg, *data["train"][:2], *data["val"][:2])
    acc = _accuracy(head, *data["test"][:2])
    assert len(data["test"][1]) >= 100
    assert acc >= LEARNED, f"{variant}: held-out accuracy {acc:.3f}"


def test_head_trained_and_stopped_on_shuffled_labels_stays_at_chance(learn_set: dict) -> None:
    """The control: no true label reaches the head, neither in training nor in early stopping."""
    data = split_arrays(learn_set["rows"], learn_set["cache"], "multiscale")
    rng = np.random.default_rng(0)
    (x, y), (x_val, y_val) = data["train"][:2], data["val"][:2]
    cfg = TrainConfig(
        optimizer="adam",
        batch_size=16,
        epochs=100,
        patience=20,
        model=ModelConfig(SIZE, "none", "multiscale"),
    )
    head, _ = fit_head(cfg, x, rng.permutation(y), x_val, rng.permutation(y_val))
    n = len(data["test"][1])
    assert chance_bound(n) < LEARNED  # the two bars are apart: the test can tell them
    assert _accuracy(head, *data["test"][:2]) <= chance_bound(n)


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_every_optimizer_trains(learn_set: dict, optimizer: str) -> None:
    data = split_arrays(learn_set["rows"], learn_set["cache"], "multiscale")
    cfg = TrainConfig(
        optimizer=optimizer,
        batch_size=32,
        epochs=100,
        patience=20,
        model=ModelConfig(SIZE, "none", "multiscale"),
    )
    head, history = fit_head(cfg, *data["train"][:2], *data["val"][:2])
    assert _accuracy(head, *data["test"][:2]) >= LEARNED
    assert min(history["val_loss"]) < 0.6 * history["val_loss"][0]


def test_training_is_seeded_and_keeps_the_best_epoch(learn_set: dict) -> None:
    data = split_arrays(learn_set["rows"], learn_set["cache"], "seed")
    cfg = TrainConfig(
        optimizer="adam",
        batch_size=16,
        epochs=12,
        patience=2,
        model=ModelConfig(SIZE, "none", "seed"),
    )
    a, hist_a = fit_head(cfg, *data["train"][:2], *data["val"][:2])
    b, hist_b = fit_head(cfg, *data["train"][:2], *data["val"][:2])
    np.testing.assert_allclose(
        a.predict(data["test"][0], verbose=0), b.predict(data["test"][0], verbose=0), atol=1e-5
    )
    assert hist_a["val_loss"] == pytest.approx(hist_b["val_loss"], rel=1e-4)
    x_val, y_val = data["val"][:2]
    restored = a.evaluate(x_val, y_val, verbose=0, return_dict=True)["loss"]
    assert restored == pytest.approx(min(hist_a["val_loss"]), rel=1e-3)
    best = int(np.argmin(hist_a["val_loss"]))
    assert len(hist_a["loss"]) == min(cfg.epochs, best + 1 + cfg.patience)  # patience honoured


def test_one_traced_step_serves_every_batch_size() -> None:
    """Batches of 16 and a last partial batch of 5 reuse one graph (Keras' fit traces twice)."""
    from leukemia.model import build_head
    from leukemia.training import _train_step, make_optimizer

    head = build_head(ModelConfig(32, "none", "seed"))
    step = _train_step(head, make_optimizer("adam", 1e-3), 512)
    rng = np.random.default_rng(0)
    before = [w.copy() for w in head.get_weights()]
    for n in (16, 16, 5, 1):
        loss_sum, correct = np.asarray(
            step(rng.random((n, 512), dtype="float32"), rng.integers(0, 4, n))
        )
        assert loss_sum > 0 and 0 <= correct <= n
    assert step.experimental_get_tracing_count() == 1
    assert any(not np.allclose(a, b) for a, b in zip(before, head.get_weights(), strict=True))


def test_grid_and_config_round_trip() -> None:
    base = TrainConfig(epochs=3, model=ModelConfig(input_size=64, weights="none"))
    configs = grid(["adam", "sgd"], [16, 64], ["seed", "multiscale"], base)
    assert len(configs) == 8
    assert {(c.optimizer, c.batch_size, c.model.variant) for c in configs} == {
        (o, b, v) for o in ("adam", "sgd") for b in (16, 64) for v in ("seed", "multiscale")
    }
    assert all(TrainConfig.from_dict(c.to_dict()) == c for c in configs)
    assert configs[0].name == "adam · bs16 · seed"
    with pytest.raises(ValueError, match="adam, sgd, rmsprop"):
        replace(base, optimizer="adagrad")


def test_linear_head_learns_synthetic_classes_and_its_l2_penalty_shrinks_the_weights(
    learn_set: dict,
) -> None:
    """The linear head: standardise → softmax, nothing in between, trained by the same loop."""
    data = split_arrays(learn_set["rows"], learn_set["cache"], "multiscale")

    def fit(l2: float):  # noqa: ANN202
        model = ModelConfig(SIZE, "none", "multiscale", head="linear", l2=l2)
        cfg = TrainConfig(optimizer="adam", batch_size=16, epochs=60, patience=10, model=model)
        return fit_head(cfg, *data["train"][:2], *data["val"][:2])[0]

    head = fit(1e-3)
    assert [layer.name for layer in head.layers] == ["features", "standardize", "probabilities"]
    assert len(head.losses) == 1  # the L2 term the training step adds to the cross-entropy
    n = len(data["test"][1])
    assert _accuracy(head, *data["test"][:2]) >= LEARNED > chance_bound(n)
    norm = float(np.linalg.norm(head.get_layer("probabilities").get_weights()[0]))
    strong = fit(1.0)
    assert float(np.linalg.norm(strong.get_layer("probabilities").get_weights()[0])) < 0.5 * norm


def test_without_a_validation_split_the_head_trains_the_given_epochs_and_keeps_the_last() -> None:
    from leukemia.training import best_epoch

    rng = np.random.default_rng(3)
    x, y = rng.random((40, 512), dtype="float32"), rng.integers(0, 4, 40)
    cfg = TrainConfig(epochs=7, patience=1, model=ModelConfig(32, "none", "seed"))
    head, history = fit_head(cfg, x, y, None, None)
    assert sorted(history) == ["accuracy", "loss"] and len(history["loss"]) == 7
    assert best_epoch(history) == 7
    assert best_epoch({"loss": [3, 2, 1, 1], "val_loss": [0.9, 0.5, 0.6, 0.7]}) == 2


def test_best_epoch_is_the_one_early_stopping_keeps() -> None:
    """The first lowest val_loss, a NaN never lower (as `fit_head` compares), the last epoch without
    validation: the figures (`plots.marked_epoch`) use this same function."""
    from leukemia import plots
    from leukemia.training import best_epoch

    nan = float("nan")
    assert best_epoch({"loss": [1, 1, 1], "val_loss": [nan, 0.7, 0.9]}) == 2
    assert best_epoch({"loss": [1, 1, 1], "val_loss": [0.5, 0.4, 0.4]}) == 2  # ties: the first
    assert (
        best_epoch({"loss": [3, 2, 1]}) == 3
        and best_epoch({"loss": [3, 2, 1], "val_loss": []}) == 3
    )
    assert not hasattr(plots, "best_epoch")  # no second definition to drift from this one


def test_grid_has_every_head_and_names_the_linear_one() -> None:
    base = TrainConfig(epochs=3, model=ModelConfig(input_size=64, weights="none"))
    configs = grid(["adam"], [16, 32], ["seed"], base, ["mlp", "linear"])
    assert [(c.model.head, c.batch_size) for c in configs] == [
        ("mlp", 16),
        ("mlp", 32),
        ("linear", 16),
        ("linear", 32),
    ]
    assert [c.name for c in configs][1:3] == ["adam · bs32 · seed", "adam · bs16 · seed · linear"]
    assert all(TrainConfig.from_dict(c.to_dict()) == c for c in configs)
    assert {c.model.head for c in grid(["adam"], [16], ["seed"], base)} == {"mlp"}
    with pytest.raises(ValueError, match="mlp, linear"):
        ModelConfig(head="svm")


def test_cv_folds_keep_identical_images_on_one_side_and_are_stratified() -> None:
    from collections import Counter

    from leukemia.training import cv_folds

    rng = np.random.default_rng(5)
    y = np.repeat([0, 1, 2, 3], [60, 40, 30, 20])  # unbalanced, as the real classes are
    groups = [f"sha{i}" for i in range(len(y))]
    for i in rng.choice(len(y) - 1, 25, replace=False):  # 25 images duplicated (same class)
        if y[i] == y[i + 1]:
            groups[i + 1] = groups[i]
    folds = cv_folds(y, groups, 5, seed=1)
    assert len(folds) == 5
    seen = np.concatenate([val for _, val in folds])
    assert sorted(seen.tolist()) == list(range(len(y)))  # every image held out exactly once
    for train, val in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in val}
        counts = Counter(y[val].tolist())
        for label, total in Counter(y.tolist()).items():
            assert abs(counts[label] - total / 5) <= 2, (label, counts)
    assert [v.tolist() for _, v in cv_folds(y, groups, 5, seed=1)] == [
        v.tolist() for _, v in folds
    ]  # the same folds for every configuration of a grid
    with pytest.raises(ValueError, match="lower cv_folds"):
        cv_folds(y[:3], groups[:3], 5)


def test_cross_validation_reports_every_fold_and_their_mean(learn_set: dict) -> None:
    from leukemia.training import cross_validate

    data = split_arrays(learn_set["rows"], learn_set["cache"], "seed")
    x = np.concatenate([data["train"][0], data["val"][0]])
    y = np.concatenate([data["train"][1], data["val"][1]])
    shas = [r["sha256"] for r in (*data["train"][2], *data["val"][2])]
    cfg = TrainConfig(batch_size=32, epochs=40, patience=5, model=ModelConfig(SIZE, "none", "seed"))
    cv = cross_validate(cfg, x, y, shas, 3)
    assert len(cv["folds"]) == 3 and sum(f["images"] for f in cv["folds"]) == len(y)
    f1 = [f["f1_macro"] for f in cv["folds"]]
    assert cv["f1_macro_mean"] == pytest.approx(np.mean(f1))
    assert cv["f1_macro_std"] == pytest.approx(np.std(f1))
    assert cv["f1_macro_mean"] >= LEARNED and cv["log_loss_mean"] > 0
    assert all(1 <= f["best_epoch"] <= 40 for f in cv["folds"])


def test_usable_folds_is_capped_by_the_largest_class_count_of_distinct_images() -> None:
    from leukemia.training import usable_folds

    assert usable_folds([0, 0, 0, 1, 1, 1], list("abcdef"), 5) == 3
    assert usable_folds([0, 0, 0, 1, 1, 1], list("abcdef"), 2) == 2
    assert usable_folds([0, 0, 0, 0, 1], list("aabbc"), 5) == 2  # identical images count once
    assert usable_folds([0, 0, 1], list("aab"), 5) == 1  # one distinct image per class: no CV


def test_augmented_copies_join_the_training_folds_only_with_their_images_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import leukemia.training as training

    x = np.arange(24, dtype="float32").reshape(12, 2)
    y = np.array([0, 1, 2, 3] * 3)
    copies = np.stack([x + 1000, x + 2000])  # copy c of image i: x[i] + 1000 * (c + 1)
    seen = []

    def fake_fit(cfg, x_train, y_train, x_val, y_val, on_epoch=None):  # noqa: ANN001, ANN202
        seen.append((x_train, y_train, x_val))
        head = lambda rows, training=False: np.full((len(rows), 4), 0.25)  # noqa: E731
        return head, {"loss": [1.0], "val_loss": [1.0]}

    monkeypatch.setattr(training, "fit_head", fake_fit)
    training.cross_validate(TrainConfig(), x, y, [str(i) for i in range(12)], 3, copies)
    assert len(seen) == 3
    for x_train, y_train, x_val in seen:
        originals = x_train[x_train[:, 0] < 1000]
        assert len(x_train) == 3 * len(originals) == 3 * 8
        for c in (1, 2):  # each training image's copies, none of a held-out image's
            np.testing.assert_array_equal(
                x_train[(x_train[:, 0] // 1000) == c] - 1000 * c, originals
            )
        assert (x_val < 1000).all()  # held-out images are scored as they are
        rows = {tuple(r % 1000): label for r, label in zip(x_train, y_train, strict=True)}
        assert all(rows[tuple(r)] == y[int(r[0]) // 2] for r in originals)
    x2, y2 = training.with_copies(x, y, copies)
    assert x2.shape == (36, 2) and list(y2) == list(y) * 3
    assert training.with_copies(x, y, None)[0] is x
