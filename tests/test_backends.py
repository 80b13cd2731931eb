"""The int8 extraction backend: close to the float32 Keras extractor, derived deterministically and
cached by what it depends on, and a fallback to Keras that says why in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from leukemia import backends
from leukemia.backends import (
    Calibration,
    agreement,
    calibration_sample,
    extractor_for,
    extractor_source,
    int8_extractor,
    int8_key,
)
from leukemia.dataset import build_manifest
from leukemia.features import build_extractor, load_images, select_variant
from leukemia.model import ModelConfig, adapted_normalization, build_head

SIZE = 32
CFG = ModelConfig(input_size=SIZE, weights="none", variant="multiscale", mask_overlay=True)

pytestmark = pytest.mark.skipif(not backends.available(), reason="OpenVINO/NNCF not installed")


@pytest.fixture(scope="module")
def pixels(smear_dir: Path) -> dict[str, np.ndarray]:
    """24 synthetic smears at 32 px: 16 to calibrate on, 8 held out."""
    records = build_manifest(smear_dir)
    images = load_images([smear_dir / r.path for r in records], SIZE)
    return {"calibration": images[:16], "held_out": images[16:]}


@pytest.fixture(scope="module")
def derived(pixels: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The int8 extractor of CFG (cached in a fresh folder) and the float32 Keras extractor's and
    its outputs on the held-out images."""
    root = tmp_path_factory.mktemp("int8")
    calibration = Calibration.from_pixels(pixels["calibration"])
    int8 = int8_extractor(CFG, calibration, root)
    keras_fp32 = build_extractor(CFG, "float32")
    return {
        "root": root,
        "calibration": calibration,
        "int8": int8,
        "fp32_out": np.asarray(keras_fp32.predict_on_batch(pixels["held_out"])),
        "int8_out": int8.predict_on_batch(pixels["held_out"]),
    }


def test_int8_outputs_are_close_to_the_float32_extractor(derived: dict) -> None:
    # Tolerance: 13 int8 convolutions (per-tensor activation scales of 1/255 of the calibrated
    # range) add up to about 1 % of an image's largest feature (measured 0.8-1.2 %); 5 % leaves
    # room for other CPUs, while a wrong scale, layout or mask moves features by tens of percent.
    ref, out = derived["fp32_out"], derived["int8_out"]
    assert out.shape == ref.shape == (8, 2560) and out.dtype == np.float32
    per_image = np.abs(out - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert per_image.max() < 0.05, per_image
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.999


def test_the_int8_network_is_cached_and_reused(
    derived: dict, pixels: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = derived["int8"].folder
    assert folder.parent == derived["root"] and (folder / "model.xml").is_file()
    assert (folder / "model.bin").stat().st_size > 0

    def no_derivation(*args: object) -> None:
        raise AssertionError("a cached int8 network was derived again")

    monkeypatch.setattr(backends, "quantize_model", no_derivation)
    again = int8_extractor(CFG, derived["calibration"], derived["root"])
    assert again.folder == folder
    assert np.array_equal(again.predict_on_batch(pixels["held_out"]), derived["int8_out"])


def test_the_same_calibration_derives_the_same_int8_network(
    derived: dict, pixels: dict, tmp_path: Path
) -> None:
    other = int8_extractor(CFG, Calibration.from_pixels(pixels["calibration"].copy()), tmp_path)
    assert other.key == derived["int8"].key
    assert (other.folder / "model.bin").read_bytes() == (
        derived["int8"].folder / "model.bin"
    ).read_bytes()
    assert np.array_equal(other.predict_on_batch(pixels["held_out"]), derived["int8_out"])


def test_the_cache_key_changes_with_weights_mask_size_and_calibration(tmp_path: Path) -> None:
    weights_file = tmp_path / "vgg16.h5"
    weights_file.write_bytes(b"some weights")
    calibration = Calibration.from_pixels(np.zeros((4, SIZE, SIZE, 3))).identity

    def key(cfg: ModelConfig, calib: str = calibration, activations: bool = False) -> str:
        return int8_key(extractor_source(cfg, activations), calib)

    keys = {
        key(CFG),
        key(ModelConfig(input_size=SIZE, weights="imagenet")),
        key(ModelConfig(input_size=SIZE, weights=str(weights_file))),
        key(ModelConfig(input_size=SIZE, weights="none", mask_overlay=False)),
        key(ModelConfig(input_size=48, weights="none")),
        key(CFG, Calibration.from_pixels(np.ones((4, SIZE, SIZE, 3))).identity),
        key(CFG, activations=True),
    }
    assert len(keys) == 7
    assert key(CFG) == key(ModelConfig(input_size=SIZE, weights="none", variant="seed"))
    assert calibration == Calibration.from_pixels(np.zeros((4, SIZE, SIZE, 3))).identity


def test_calibration_images_are_a_seeded_sample_whatever_the_order() -> None:
    shas = [f"{i:064x}" for i in range(1000)]
    sample = calibration_sample(shas, 300)
    assert len(sample) == 300 == len(set(sample)) and sample == sorted(sample)
    assert calibration_sample(shas[::-1] + shas[:10], 300) == sample
    assert calibration_sample(shas, 300, seed=1) != sample
    assert calibration_sample(shas[:5], 300) == sorted(shas[:5])


def test_a_missing_toolchain_falls_back_to_keras_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    real = backends.importlib.util.find_spec
    monkeypatch.setattr(
        backends.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "nncf" else real(name, *a),
    )
    assert not backends.available() and "nncf not installed" in backends.unavailable_reason()
    calibration = Calibration.from_pixels(np.zeros((2, SIZE, SIZE, 3)))
    with caplog.at_level(logging.INFO, logger="leukemia.backends"):
        extractor, used = extractor_for("int8", CFG, "float32", calibration, tmp_path)
    assert used == "keras" and extractor.name == "extractor_float32"
    assert [r.getMessage() for r in caplog.records] == [
        "int8 backend unavailable (nncf not installed (pip install -r requirements.txt)): "
        "extracting with keras float32"
    ]
    assert not list(tmp_path.iterdir())


def test_a_failed_derivation_falls_back_to_keras_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    def fails(*args: object) -> None:
        raise RuntimeError("Cannot compile: unsupported ISA\nlong trace")

    monkeypatch.setattr(backends, "quantize_model", fails)
    calibration = Calibration.from_pixels(np.zeros((2, SIZE, SIZE, 3)))
    with caplog.at_level(logging.WARNING, logger="leukemia.backends"):
        _, used = extractor_for("int8", CFG, "float32", calibration, tmp_path)
    assert used == "keras"
    assert [r.getMessage() for r in caplog.records] == [
        "int8 backend unavailable (cannot derive or compile the int8 network: Cannot compile: "
        "unsupported ISA): extracting with keras float32"
    ]
    with pytest.raises(ValueError, match="backend must be one of keras, int8"):
        extractor_for("fp16", CFG, "float32", calibration, tmp_path)


def test_agreement_of_a_head_on_float32_and_int8_features(derived: dict) -> None:
    ref = select_variant(derived["fp32_out"], CFG.variant)
    out = select_variant(derived["int8_out"], CFG.variant)
    head = build_head(CFG, adapted_normalization(ref))
    p, q = (np.asarray(head.predict_on_batch(x)) for x in (ref, out))
    found = agreement(head, ref, out)
    assert found == {
        "argmax_agreement": pytest.approx(float((p.argmax(1) == q.argmax(1)).mean())),
        "max_probability_difference": pytest.approx(float(np.abs(p - q).max())),
        "images": 8,
    }
    same = agreement(head, ref, ref)
    assert same["argmax_agreement"] == 1.0 and same["max_probability_difference"] == 0.0
