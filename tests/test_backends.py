"""The int8 extraction backend: close to the float32 Keras extractor, derived deterministically and
cached by what it depends on, and a fallback to Keras that says why in one line."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
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


# --- the int8 backend in the pipeline: a run trained on int8 features, served on the same trunk ----

MODEL_NAME = "leukemia-classifier"


@pytest.fixture(scope="module")
def int8_champion(smear_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A champion trained on int8 features (32 px, no base weights, two epochs) and promoted the
    pipeline's way, in an MLflow store and data folder of its own."""
    from conftest import quick_train_config, store_at

    from leukemia import promotion, tracking
    from leukemia.gate import Thresholds
    from leukemia.runs import train_folder

    root = tmp_path_factory.mktemp("int8-champion")
    cfg = quick_train_config(SIZE)
    cfg = replace(cfg, model=replace(cfg.model, backend="int8"))
    with store_at(root), pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        done = train_folder(
            smear_dir, cfg, root, (0.5, 0.25, 0.25), "float32", tags={"airflow_run_id": "m__i"}
        )
        anything = Thresholds(0.0, 0.0, 0.0, 0.0, max_test_ece=1.0)  # the gate only reports
        decided = promotion.select_and_promote(
            tracking.setup(), done["split"].path, smear_dir, "m__i", anything
        )
        yield {**done, "root": root, "version": decided["version"], "cfg": cfg}


def _test_features(champion: dict) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The test rows, their cached int8 features and their float32 Keras ones (seed variant)."""
    from leukemia.features import load_features, reference_dir

    rows = [r for r in champion["rows"] if r["split"] == "test"]
    shas, cache = [r["sha256"] for r in rows], champion["features"].cache_dir
    variant = champion["cfg"].model.variant
    fp32 = load_features(reference_dir(cache, champion["cfg"].model), shas, variant)
    return rows, load_features(cache, shas, variant), fp32


def test_a_run_on_int8_features_logs_its_backend_and_its_agreement_with_the_float32_trunk(
    int8_champion: dict,
) -> None:
    from conftest import store_at

    from leukemia import tracking

    run_id = int8_champion["result"].run_id
    assert int8_champion["features"].backend == "int8"
    with store_at(int8_champion["root"]):
        run = tracking.get_run(run_id)
        head = tracking.load_head(run_id)  # calibrated: the probabilities scoring gives
    assert run.data.params["backend"] == "int8"
    assert json.loads(run.data.tags["config"])["backend"] == "int8"
    rows, int8, fp32 = _test_features(int8_champion)
    found = agreement(head, fp32, int8)
    metrics = run.data.metrics
    assert found["images"] == len(rows) > 0
    assert metrics["int8_test_argmax_agreement"] == pytest.approx(found["argmax_agreement"])
    assert metrics["int8_test_max_probability_difference"] == pytest.approx(
        found["max_probability_difference"]
    )
    assert 0 < metrics["int8_test_max_probability_difference"]  # two trunks, not one twice


def test_predict_with_an_int8_trained_model_feeds_its_head_the_int8_features(
    int8_champion: dict, smear_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import store_at

    from leukemia import predict

    rows, int8, fp32 = _test_features(int8_champion)
    paths = [smear_dir / r["path"] for r in rows]
    uri = f"models:/{MODEL_NAME}/{int8_champion['version']}"
    with store_at(int8_champion["root"]):
        loaded = predict.load_model(uri)
        found, _ = predict.predict([str(p) for p in paths], uri)
    assert loaded.int8 is not None
    pixels = load_images(paths, SIZE)
    features, probs = loaded.int8.predict(pixels)
    # the trunk the head was trained on: the cached int8 features, not the float32 ones
    np.testing.assert_allclose(features, int8, rtol=1e-5, atol=1e-5 * np.abs(int8).max())
    assert not np.allclose(features, fp32, rtol=1e-3)
    head = loaded.model.get_layer("head")
    np.testing.assert_allclose(probs, head.predict_on_batch(int8), rtol=1e-5, atol=1e-6)
    assert [p.image for p in found] == [str(p) for p in paths]
    np.testing.assert_allclose([p.probabilities for p in found], probs, rtol=1e-5, atol=1e-6)


def test_scoring_an_int8_champion_serves_its_int8_trunk_and_falls_back_with_one_line(
    int8_champion: dict,
    smear_dir: Path,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from conftest import store_at

    from leukemia import predict
    from leukemia.config import CLASSES
    from leukemia.scoring import score_incoming
    from leukemia.storage import s3_client

    rows, int8, _ = _test_features(int8_champion)
    client = s3_client("aws_default")
    for r in rows:
        client.put_object(
            Bucket=bucket,
            Key=f"incoming/{r['sha256']}.jpg",
            Body=(smear_dir / r["path"]).read_bytes(),
        )
    with store_at(int8_champion["root"]):
        scored = score_incoming(bucket, "incoming/", explain="none")
        body = client.get_object(Bucket=bucket, Key=scored.predictions_uri.split("/", 3)[3])
        csv_rows = {r["key"]: r for r in csv.DictReader(io.StringIO(body["Body"].read().decode()))}
        loaded = predict.load_model(f"models:/{MODEL_NAME}/{int8_champion['version']}")
        expected = np.asarray(loaded.model.get_layer("head").predict_on_batch(int8))
        got = [[float(csv_rows[f"incoming/{r['sha256']}.jpg"][c]) for c in CLASSES] for r in rows]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        real = backends.importlib.util.find_spec
        monkeypatch.setattr(
            backends.importlib.util,
            "find_spec",
            lambda name, *a: None if name == "openvino" else real(name, *a),
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="leukemia.backends"):
            fallback = predict.load_model(f"models:/{MODEL_NAME}/{int8_champion['version']}")
    assert fallback.int8 is None
    assert [r.getMessage() for r in caplog.records] == [
        "int8 backend unavailable (openvino not installed (pip install -r requirements.txt)): "
        "serving on the model's float32 trunk"
    ]


def test_the_gate_measures_an_int8_champion_as_scoring_serves_it(
    int8_champion: dict, smear_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate evaluates the version through the int8 path scoring serves (every test image),
    and its confusion matrix is the head's on the int8 features."""
    from conftest import store_at

    from leukemia import gate, predict, tracking
    from leukemia.features import labels_to_index

    rows, int8, _ = _test_features(int8_champion)
    served: list[int] = []
    real = predict.ServedInt8.predict

    def spy(self: object, pixels: np.ndarray) -> tuple:
        served.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(predict.ServedInt8, "predict", spy)
    with store_at(int8_champion["root"]):
        split, experiment = int8_champion["split"].path, tracking.setup()
        evaluation, _ = gate.evaluate_version(
            MODEL_NAME, int8_champion["version"], split, smear_dir, experiment, "g"
        )
        head = predict.load_model(f"models:/{MODEL_NAME}/{int8_champion['version']}")
    assert sum(served) == len(rows)
    y = np.asarray(labels_to_index([r["label"] for r in rows]))
    counts = np.zeros((4, 4), dtype="int64")
    probs = head.model.get_layer("head").predict_on_batch(int8)
    np.add.at(counts, (y, np.asarray(probs).argmax(1)), 1)
    assert evaluation.confusion_matrix == counts.tolist()
