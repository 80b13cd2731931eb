"""Figures: each writes a non-blank PNG, grids lay out as asked, bad input fails with a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukemia.config import CLASSES
from leukemia.plots import (
    comparison_png,
    confusion_matrix_png,
    contact_sheet_png,
    marked_epoch,
    prediction_grid_png,
    reliability_diagram_png,
    training_curves_png,
)
from leukemia.training import best_epoch

HISTORY = {
    "loss": [1.3, 0.9, 0.7, 0.6, 0.55],
    "val_loss": [1.2, 0.95, 0.8, 0.85, 0.9],
    "accuracy": [0.4, 0.6, 0.7, 0.75, 0.8],
    "val_accuracy": [0.45, 0.58, 0.66, 0.65, 0.64],
}


def _png(path: Path) -> tuple[int, int]:
    """Assert `path` is a decodable, non-blank PNG; return its (width, height)."""
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("L"), dtype="float64")
    assert pixels.size > 0
    assert pixels.std() > 10, "figure looks blank"
    return pixels.shape[1], pixels.shape[0]


@pytest.fixture()
def images(tmp_path: Path) -> list[np.ndarray | Path]:
    """30 small random RGB images: every other one an array, the rest PNG files."""
    rng = np.random.default_rng(0)
    out: list[np.ndarray | Path] = []
    for i in range(30):
        arr = rng.integers(0, 256, size=(48, 64, 3), dtype="uint8")
        if i % 2:
            path = tmp_path / "img" / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(arr).save(path)
            out.append(path)
        else:
            out.append(arr)
    return out


def _grid(images: list[np.ndarray | Path], path: Path, **kwargs: int) -> tuple[int, int]:
    n = len(images)
    y_true = [i % 4 for i in range(n)]
    y_pred = [(i // 3) % 4 for i in range(n)]
    return _png(prediction_grid_png(images, y_true, y_pred, [0.9] * n, path, **kwargs))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype="int16")


def test_confusion_matrix_png_draws_its_counts_and_nothing_else(tmp_path: Path) -> None:
    cm = [[50, 2, 0, 0], [3, 40, 5, 0], [0, 4, 45, 1], [0, 0, 0, 0]]  # an empty row is allowed
    out = confusion_matrix_png(cm, tmp_path / "new" / "dir" / "cm.png")
    assert out == tmp_path / "new" / "dir" / "cm.png"
    size = _png(out)
    eye = confusion_matrix_png(np.eye(4, dtype=int) * 7, tmp_path / "eye.png")
    again = confusion_matrix_png(cm, tmp_path / "again.png")
    assert _png(eye) == size
    assert np.array_equal(_pixels(out), _pixels(again))  # the same counts: the same picture
    changed = np.abs(_pixels(out) - _pixels(eye)).max(axis=2) > 30
    assert 0.01 < changed.mean() < 0.5  # other counts: other cells and numbers, same frame


@pytest.mark.parametrize(
    "cm",
    [
        [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        [[1, 2, 3, 4]] * 3,
        [[1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]],
        [[1] * 5] * 5,
    ],
)
def test_confusion_matrix_rejects_wrong_shape(cm: list[list[int]], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=", ".join(CLASSES)):
        confusion_matrix_png(cm, tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_training_curves_png_draws_the_validation_curves_only_when_there_are_any(
    tmp_path: Path,
) -> None:
    full = training_curves_png(HISTORY, tmp_path / "curves.png", title="adam-bs32")
    no_val = {"loss": HISTORY["loss"], "accuracy": HISTORY["accuracy"]}
    train_only = training_curves_png(no_val, tmp_path / "no_val.png")
    assert _png(full) == _png(train_only)
    _png(training_curves_png({"loss": [0.9]}, tmp_path / "one_epoch.png"))
    # the validation curves (and the best-epoch marker) add coloured pixels to the same frame
    coloured = [(np.ptp(_pixels(path), axis=2) > 60).sum() for path in (full, train_only)]
    assert coloured[0] > coloured[1] * 1.3


def test_best_epoch_is_min_val_loss() -> None:
    """The curves mark the epoch early stopping kept (`training.best_epoch`, the one definition),
    and nothing when no epoch was chosen on a validation loss."""
    assert best_epoch(HISTORY) == 3 == marked_epoch(HISTORY)
    assert marked_epoch({"loss": [1.0, 0.5]}) is None
    assert best_epoch({"loss": [1.0, 0.5]}) == 2  # no validation: the last epoch's weights stay
    assert marked_epoch({"loss": [1.0], "val_loss": [float("nan")]}) is None
    assert best_epoch({"val_loss": [float("nan"), 0.7, 0.9]}) == 2
    assert marked_epoch({"val_loss": [float("nan"), 0.7, 0.9]}) == 2


def test_prediction_grid_caps_at_max_images(
    images: list[np.ndarray | Path], tmp_path: Path
) -> None:
    capped = _grid(images, tmp_path / "capped.png", ncols=5, max_images=20)
    exact = _grid(images[:20], tmp_path / "exact.png", ncols=5, max_images=20)
    assert capped == exact  # 4 rows x 5 columns either way


def test_prediction_grid_layout_follows_ncols(
    images: list[np.ndarray | Path], tmp_path: Path
) -> None:
    w5, h5 = _grid(images[:20], tmp_path / "five.png", ncols=5)  # 4 x 5
    w10, h10 = _grid(images[:20], tmp_path / "ten.png", ncols=10)  # 2 x 10
    w20, h20 = _grid(images[:20], tmp_path / "twenty.png", ncols=20)  # 1 x 20
    assert w5 / h5 < w10 / h10 < w20 / h20
    assert w10 == pytest.approx(2 * w5, rel=0.05)
    # fewer images than columns: no empty columns
    assert _grid(images[:3], tmp_path / "three.png", ncols=5)[0] < w5


def test_prediction_grid_rejects_bad_input(images: list[np.ndarray | Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one entry per image"):
        prediction_grid_png(images[:3], [0, 1], [0, 1, 2], [0.9] * 3, tmp_path / "g.png")
    with pytest.raises(ValueError, match="Benign, Early, Pre, Pro"):
        prediction_grid_png(images[:2], [0, 4], [0, 1], [0.9] * 2, tmp_path / "g.png")


def test_contact_sheet_png(images: list[np.ndarray | Path], tmp_path: Path) -> None:
    gray = np.linspace(0, 1, 40 * 40).reshape(40, 40)  # float 0-1, single channel
    sheet = [*images[:5], gray]
    captions = [f"image {i}\nGrad-CAM" for i in range(len(sheet))]
    w, h = _png(contact_sheet_png(sheet, captions, tmp_path / "sheet.png", ncols=3))
    assert w / h > 1  # 2 rows x 3 columns
    with pytest.raises(ValueError, match="captions"):
        contact_sheet_png(images[:2], ["only one"], tmp_path / "bad.png")


def _rows(variants: list[str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for v, variant in enumerate(variants):
        for o, optimizer in enumerate(("adam", "sgd")):
            for b, batch in enumerate((64, 8, 32, 16)):  # unsorted on purpose
                rows.append(
                    {
                        "variant": variant,
                        "optimizer": optimizer,
                        "batch_size": batch,
                        "val_f1_macro": 0.5 + 0.05 * b + 0.1 * o - 0.02 * v,
                        "val_accuracy": 0.55 + 0.04 * b,
                        **({"test_accuracy": 0.6 + 0.03 * b} if batch != 8 else {}),
                    }
                )
    rows[2]["selected"] = True
    return rows


def test_comparison_png_one_and_two_variants(tmp_path: Path) -> None:
    one = [{k: v for k, v in r.items() if k != "variant"} for r in _rows(["seed"])]
    w1, h1 = _png(comparison_png(one, tmp_path / "one.png"))
    w2, h2 = _png(comparison_png(_rows(["seed", "augmented"]), tmp_path / "two.png"))
    assert w1 == w2
    assert h2 > 1.5 * h1


def test_comparison_png_tolerates_missing_metrics(tmp_path: Path) -> None:
    rows = _rows(["seed"])
    _png(comparison_png(rows, tmp_path / "missing.png", metrics=("val_f1_macro", "not_logged")))
    repeated = rows + [{**r, "val_f1_macro": 0.4} for r in rows]  # two runs per configuration
    _png(comparison_png(repeated, tmp_path / "repeated.png"))
    with pytest.raises(ValueError, match="optimizer"):
        comparison_png([{"batch_size": 8}], tmp_path / "bad.png")


def test_reliability_diagram_draws_one_curve_per_series_and_needs_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(400, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.asarray([rng.choice(4, p=p) for p in probs])
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)
    one = reliability_diagram_png({"test": (probs, labels)}, tmp_path / "one.png")
    two = reliability_diagram_png(
        {"before": (sharp, labels), "after": (probs, labels)}, tmp_path / "two.png"
    )
    assert _png(one) == _png(two)  # the same frame
    coloured = [(np.ptp(_pixels(path), axis=2) > 60).sum() for path in (two, one)]
    assert coloured[0] > coloured[1] * 1.3  # a second curve adds its colour
    with pytest.raises(ValueError, match="no curves to draw"):
        reliability_diagram_png({}, tmp_path / "none.png")
