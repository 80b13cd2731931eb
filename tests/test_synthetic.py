"""Tests for the synthetic blood-smear generator that the other tests and the demo train on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import leukemia
from leukemia.dev.synthetic import CLASSES, generate, render_smear


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _purple_fraction(rgb: np.ndarray) -> float:
    """Share of pixels stained like a nucleus: purple (red and blue well above green), not pink."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return float(((r > g + 15) & (b > g + 40) & (g < 140)).mean())


def _by_class(paths: list[Path]) -> dict[str, list[Path]]:
    return {c: [p for p in paths if p.parent.name == c] for c in CLASSES}


def test_classes_are_the_data_sets_four() -> None:
    assert tuple(CLASSES) == ("Benign", "Early", "Pre", "Pro")


def test_generate_writes_the_public_layout(tmp_path: Path) -> None:
    paths = generate(tmp_path, 3, size=32, seed=1)

    assert paths == sorted(paths)
    assert len(paths) == 12
    for label in CLASSES:
        names = sorted(p.name for p in (tmp_path / label).iterdir())
        assert names == [f"synthetic-{label.lower()}-{i:04d}.jpg" for i in range(3)]
    assert {p.parent for p in paths} == {tmp_path / c for c in CLASSES}
    assert all(p.is_file() for p in paths)


def test_images_are_rgb_jpegs_of_the_requested_size(tmp_path: Path) -> None:
    for size in (32, 48):
        for path in generate(tmp_path / str(size), 1, size=size, seed=2):
            with Image.open(path) as im:
                assert im.format == "JPEG"
                assert im.mode == "RGB"
                assert im.size == (size, size)


def test_render_smear_returns_an_rgb_image() -> None:
    image = render_smear("Pre", np.random.default_rng(0), size=40)

    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == (40, 40)


def test_same_seed_gives_the_same_bytes_and_another_seed_other_images(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", 2, size=32, seed=7)
    again = generate(tmp_path / "b", 2, size=32, seed=7)
    other = generate(tmp_path / "c", 2, size=32, seed=8)

    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert all(a.read_bytes() != o.read_bytes() for a, o in zip(first, other, strict=True))
    # images within one run differ too
    assert len({p.read_bytes() for p in first}) == len(first)


def test_a_class_looks_the_same_whatever_other_classes_are_generated(tmp_path: Path) -> None:
    alone = generate(tmp_path / "alone", 2, size=32, seed=3, classes=["Pro"])
    together = generate(tmp_path / "all", 2, size=32, seed=3)

    assert [p.parent.name for p in alone] == ["Pro", "Pro"]
    assert not (tmp_path / "alone" / "Benign").exists()
    pro = [p for p in together if p.parent.name == "Pro"]
    assert [p.read_bytes() for p in alone] == [p.read_bytes() for p in pro]


def test_classes_differ_in_nucleus_area(tmp_path: Path) -> None:
    paths = _by_class(generate(tmp_path, 16, size=48, seed=5))
    benign = [_purple_fraction(_pixels(p)) for p in paths["Benign"]]
    pro = [_purple_fraction(_pixels(p)) for p in paths["Pro"]]

    # Pro blasts have big nuclei; benign lymphocytes small dense ones
    assert np.median(pro) > 2 * np.median(benign)
    assert np.percentile(benign, 75) < np.percentile(pro, 25)


def test_mean_colour_does_not_give_the_class_away(tmp_path: Path) -> None:
    def mean_rgb(seed: int) -> tuple[np.ndarray, np.ndarray]:
        paths = generate(tmp_path / str(seed), 30, size=32, seed=seed)
        x = np.stack([_pixels(p).reshape(-1, 3).mean(axis=0) for p in paths])
        y = np.array([CLASSES.index(p.parent.name) for p in paths])
        return x, y

    x_train, y_train = mean_rgb(0)
    x_test, y_test = mean_rgb(1)
    centroids = np.stack([x_train[y_train == k].mean(axis=0) for k in range(len(CLASSES))])
    nearest = np.argmin(((x_test[:, None, :] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    accuracy = float((nearest == y_test).mean())

    assert accuracy <= 0.6, f"mean RGB alone classifies {accuracy:.0%} of smears"


@pytest.mark.parametrize("size", [64, 224])
def test_overlays_differ_by_class_and_stay_inside_the_masked_square(size: int) -> None:
    from leukemia.dev.synthetic import OVERLAY_STYLES, stamp_overlay
    from leukemia.model import overlay_start

    start = overlay_start(size)
    smear = render_smear("Pre", np.random.default_rng(0), size=size)
    plain = np.asarray(smear, dtype=int)
    stamped = {c: np.asarray(stamp_overlay(smear, s), dtype=int) for c, s in OVERLAY_STYLES.items()}
    assert set(OVERLAY_STYLES) == set(CLASSES) and len(set(OVERLAY_STYLES.values())) == 4
    for label, pixels in stamped.items():
        changed = np.abs(pixels - plain).sum(axis=2) > 0
        assert not changed[:start].any() and not changed[:, :start].any(), label
        assert changed[start:, start:].mean() > 0.05, label
    corners = [p[start:, start:] for p in stamped.values()]
    assert all(np.abs(a - b).mean() > 10 for i, a in enumerate(corners) for b in corners[i + 1 :])


def test_overlay_only_smears_carry_the_label_in_the_overlay_alone(tmp_path: Path) -> None:
    plain = generate(tmp_path / "plain", 4, size=64, seed=2)
    again = generate(tmp_path / "again", 4, size=64, seed=2, informative_cells=True)
    mixed = generate(tmp_path / "mixed", 4, size=64, seed=2, overlay=True, informative_cells=False)
    assert [p.read_bytes() for p in plain] == [p.read_bytes() for p in again]  # default unchanged
    assert [p.relative_to(tmp_path / "mixed") for p in mixed] == [
        p.relative_to(tmp_path / "plain") for p in plain
    ]
    # the corner square of every image of a class holds that class's overlay
    corners = {
        c: np.stack([_pixels(p)[54:, 54:] for p in mixed if p.parent.name == c]).astype(float)
        for c in CLASSES
    }
    spread_within = max(float(np.abs(v - v.mean(axis=0)).mean()) for v in corners.values())
    means = [v.mean(axis=0) for v in corners.values()]
    spread_between = min(
        float(np.abs(a - b).mean()) for i, a in enumerate(means) for b in means[i + 1 :]
    )
    assert spread_between > 2 * spread_within


def test_background_tint_shifts_each_class_by_its_own_colour(tmp_path: Path) -> None:
    from leukemia.dev.synthetic import TINTS

    plain = generate(tmp_path / "plain", 2, size=64, seed=3)
    tinted = generate(tmp_path / "tinted", 2, size=64, seed=3, background_tint=True)
    for a, b in zip(plain, tinted, strict=True):
        shift = _pixels(b).astype(float).mean(axis=(0, 1)) - _pixels(a).astype(float).mean(
            axis=(0, 1)
        )
        # JPEG and clipping blur the shift a little; each class moves by its own tint
        np.testing.assert_allclose(shift, TINTS[a.parent.name], atol=3.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_per_class": 0}, "n_per_class must be an integer >= 1"),
        ({"n_per_class": -3}, "n_per_class must be an integer >= 1"),
        ({"size": 31}, "size must be an integer >= 32"),
        ({"classes": ["Benign", "Blast"]}, "expected one of Benign, Early, Pre, Pro"),
        ({"classes": []}, "at least one of Benign, Early, Pre, Pro"),
        ({"classes": ["Pre", "Pre"]}, "must not repeat"),
        ({"quality": 0}, "from 1 to 100"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"n_per_class": 1, "size": 32} | kwargs

    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **args)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("label", "size", "message"),
    [("benign", 64, "expected one of Benign, Early, Pre, Pro"), ("Pro", 16, ">= 32")],
)
def test_render_smear_rejects_bad_arguments(label: str, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_smear(label, np.random.default_rng(0), size=size)


def test_import_does_no_heavy_work() -> None:
    include = str(Path(leukemia.__file__).resolve().parents[1])  # the include/ this test imports
    code = "import sys, leukemia.dev.synthetic; assert 'tensorflow' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": include}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
