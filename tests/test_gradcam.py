"""Grad-CAM: heatmaps of the nested pipeline model for both feature variants, overlays and the sheet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leukemia.config import CLASSES

SIZE = 48


# --- fast checks, no TensorFlow -------------------------------------------------------------------


def test_resize_heatmap_scales_to_unit_range() -> None:
    from leukemia.gradcam import resize_heatmap

    coarse = np.array([[0.0, 2.0, 0.0], [0.0, 6.0, 1.0], [0.0, 0.0, 0.0]], dtype="float32")
    big = resize_heatmap(coarse, SIZE)
    assert big.shape == (SIZE, SIZE) and big.dtype == np.float32
    assert big.min() == 0.0 and big.max() == pytest.approx(1.0)
    peak = np.unravel_index(big.argmax(), big.shape)
    assert (
        abs(peak[0] - SIZE // 2) <= 3 and abs(peak[1] - SIZE // 2) <= 3
    )  # the hot cell stays central
    assert not resize_heatmap(
        np.full((3, 3), 5.0), SIZE
    ).any()  # a flat map says nothing: all zeros


def test_overlay_blends_the_colour_map_into_the_image() -> None:
    from matplotlib import colormaps

    from leukemia.gradcam import caption, overlay

    image = np.full((SIZE, SIZE, 3), 200.0, dtype="float32")
    heat = np.zeros((SIZE, SIZE), dtype="float32")
    heat[:, SIZE // 2 :] = 1.0
    out = overlay(image, heat, alpha=0.5)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    hot = np.asarray(colormaps["jet"](1.0)[:3]) * 255
    np.testing.assert_allclose(out[0, -1], 0.5 * 200 + 0.5 * hot, atol=1)
    assert not np.array_equal(out[0, 0], out[0, -1])
    assert caption([0.01, 0.02, 0.97, 0.0]) == "pred: Pre (97%)"


# --- the real network -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixels(smear_dir: Path) -> Any:
    from leukemia.features import load_images

    paths = [sorted((smear_dir / c).iterdir())[0] for c in CLASSES]
    return load_images(paths, SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["seed", "multiscale"])
def test_heatmaps_for_both_variants(variant: str, pixels: Any, tmp_path: Path) -> None:
    from PIL import Image

    from leukemia.gradcam import GradCam, explain
    from leukemia.model import ModelConfig, build_model

    model = build_model(ModelConfig(input_size=SIZE, weights="none", variant=variant))
    heat, probs = GradCam(model)(pixels)
    assert heat.shape == (len(pixels), SIZE, SIZE)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    for h in heat:
        assert h.max() == pytest.approx(1.0) and h.std() > 0.05  # normalised, and not constant
    # the re-wired model computes the same probabilities as the model itself
    np.testing.assert_allclose(probs, model.predict(pixels, verbose=0), rtol=1e-4, atol=1e-6)
    # explaining another class gives another map
    other, _ = GradCam(model)(pixels[:1], class_index=[(int(probs[0].argmax()) + 1) % len(CLASSES)])
    assert not np.allclose(other[0], heat[0])

    paths, sheet = explain(model, pixels, [f"cell-{c}.jpg" for c in CLASSES], tmp_path)
    assert [p.name for p in paths] == [
        f"{i:05d}_cell-{c}_gradcam.png" for i, c in enumerate(CLASSES, 1)
    ]
    with Image.open(paths[0]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        assert not np.array_equal(np.asarray(im), pixels[0].astype("uint8"))  # the heatmap is drawn
    assert sheet == tmp_path / "contact_sheet.png" and sheet.stat().st_size > 1000


@pytest.mark.slow
def test_gradcam_rejects_a_model_without_the_pipeline_parts() -> None:
    import keras

    from leukemia.gradcam import GradCam

    inputs = keras.Input((SIZE, SIZE, 3))
    plain = keras.Model(
        inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(inputs))
    )
    with pytest.raises(ValueError, match="has no layer 'preprocess'"):
        GradCam(plain)
