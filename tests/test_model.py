"""The network: architecture, preprocessing inside the model, weights loading and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukemia.model import (
    VGG16_CONV_PARAMS,
    ModelConfig,
    build_model,
    build_preprocess,
    build_trunk,
    feature_width,
    trainable_params,
)
from leukemia.weights import WeightsUnavailable, weights_identity


def test_default_model_matches_the_reference_shape() -> None:
    model = build_model(ModelConfig(input_size=224, weights="none"))
    trainable = trainable_params(model)
    frozen = model.count_params() - trainable
    assert 170_000 <= trainable <= 176_000  # the reference head had 173,692
    # plus Normalization stats, the preprocess Dense and the overlay fill Dense (on by default)
    assert frozen - VGG16_CONV_PARAMS == 2 * 512 + 1 + 12 + 12
    assert model.input_shape == (None, 224, 224, 3)
    assert model.output_shape == (None, 4)
    trunk = model.get_layer("vgg16_trunk")
    assert not trunk.trainable and trunk.count_params() == VGG16_CONV_PARAMS


def test_preprocessing_layer_is_vgg16_preprocess_input() -> None:
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(x.copy())
    got = np.asarray(build_preprocess(32)(x))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_overlay_square_is_filled_before_the_vgg16_preprocessing() -> None:
    from leukemia.model import OVERLAY_FILL, overlay_start

    assert [overlay_start(s) for s in (32, 64, 224)] == [27, 54, 192]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    other = x.copy()
    other[:, 54:, 54:] = rng.uniform(0, 255, (2, 10, 10, 3))  # another overlay in the corner
    plain = np.asarray(build_preprocess(64)(x))
    masked = build_preprocess(64, mask_overlay=True)
    got, swapped = np.asarray(masked(x)), np.asarray(masked(other))
    np.testing.assert_array_equal(got[:, :54], plain[:, :54])  # the rest is untouched
    np.testing.assert_array_equal(got[:, :, :54], plain[:, :, :54])
    np.testing.assert_array_equal(got, swapped)  # the corner no longer reaches the network
    fill = np.asarray(build_preprocess(64)(np.broadcast_to(OVERLAY_FILL, (1, 64, 64, 3))))
    np.testing.assert_allclose(got[0, 54:, 54:], fill[0, 54:, 54:], atol=1e-3)


def test_masked_model_loads_in_safe_mode_without_custom_objects(tmp_path: Path) -> None:
    import keras

    model = build_model(ModelConfig(input_size=48, weights="none", mask_overlay=True))
    assert model.get_layer("preprocess").get_layer("overlay_fill") is not None
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(1).uniform(0, 255, (3, 48, 48, 3)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    unmasked = build_model(ModelConfig(input_size=48, weights="none", mask_overlay=False))
    names = {layer.name for layer in unmasked.get_layer("preprocess").layers}
    assert not any(n.startswith("overlay_") for n in names)


def test_variants_and_widths() -> None:
    assert feature_width("seed") == 512
    assert feature_width("multiscale") == 2 * (256 + 512 + 512)
    model = build_model(ModelConfig(input_size=64, weights="none", variant="multiscale"))
    assert model.output_shape == (None, 4)
    with pytest.raises(ValueError, match="seed, multiscale"):
        ModelConfig(variant="pyramid")
    with pytest.raises(ValueError, match="at least 32"):
        ModelConfig(input_size=16)


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    import keras

    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    trunk = build_trunk(ModelConfig(input_size=48, weights=str(path)))
    np.testing.assert_array_equal(
        trunk.get_layer("block1_conv1").get_weights()[0],
        source.get_layer("block1_conv1").get_weights()[0],
    )
    assert weights_identity(str(path)).startswith("vgg16_notop.weights-")


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="nowhere.h5"):
        build_trunk(ModelConfig(input_size=32, weights=str(tmp_path / "nowhere.h5")))


def test_mismatched_weights_file_says_what_was_expected(tmp_path: Path) -> None:
    import keras

    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    path = tmp_path / "not_vgg.weights.h5"
    other.save_weights(path)
    with pytest.raises(WeightsUnavailable) as err:  # a ValueError: a setting, not a passing fault
        build_trunk(ModelConfig(input_size=32, weights=str(path)))
    assert str(path) in str(err.value)
    assert "14,714,688" in str(err.value) and "block1_conv1" in str(err.value)


def test_normalization_switches_off_units_dead_in_training() -> None:
    from leukemia.model import adapted_normalization

    rng = np.random.default_rng(0)
    x = rng.normal(5, 2, (200, 4)).astype("float32")
    x[:, 2] = 0.0  # a ReLU unit that never fired on the training images
    x[:, 3] = 1.0 + rng.normal(0, 1e-6, 200)  # nearly constant
    norm = adapted_normalization(x)
    new = np.array([[5, 5, 30.0, 3.0]], dtype="float32")  # the dead unit fires on a new image
    out = np.asarray(norm(new))[0]
    assert abs(out[0]) < 0.5 and abs(out[2]) < 1e-3  # ignored, not 3e7
    assert abs(out[3]) < 1e3  # floored variance keeps it bounded
