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
