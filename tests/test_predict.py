"""Prediction CLI: output equals the model's own predictions, every bad input has a clear outcome,
and s3:// inputs are read through the Airflow connection (moto over HTTP)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import new_mlflow_store, quick_train_config

from leukemia.config import CLASSES

SIZE = 48
MODEL_NAME = "leukemia-classifier"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def champion(smear_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A champion trained and promoted the pipeline's way (48 px, no base weights, 2 epochs), in a
    SQLite MLflow of its own; artifacts land in the module's temporary folder."""
    from leukemia import promotion, tracking
    from leukemia.gate import Thresholds
    from leukemia.runs import train_folder

    root = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("LEUKEMIA_DATA_DIR", str(root / "data"))
        mp.setenv("MLFLOW_TRACKING_URI", new_mlflow_store(root))
        cfg = quick_train_config(SIZE)  # the card / predictions do not depend on selection
        done = train_folder(
            smear_dir, cfg, root, (0.5, 0.25, 0.25), "float32", tags={"airflow_run_id": "manual__p"}
        )
        info = done["split"]
        anything = Thresholds(0.0, 0.0, 0.0, 0.0, max_test_ece=1.0)  # the gate only reports
        decided = promotion.select_and_promote(
            tracking.setup(), info.path, smear_dir, "manual__p", anything
        )
        yield {"root": root, "version": decided["version"]}


@pytest.fixture(scope="module")
def images(smear_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Ten smears in nested folders (plus a hidden file and a non-image that must be ignored)."""
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for label in CLASSES:
        for src in sorted((smear_dir / label).iterdir())[: 3 if label in ("Benign", "Pre") else 2]:
            dest = folder / "ward-a" / label.lower() / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest)
            paths.append(dest)
    (folder / "ward-a" / ".hidden.jpg").write_bytes(b"not looked at")
    (folder / "notes.txt").write_text("not an image")
    return {"folder": folder, "paths": sorted(paths)}


@pytest.fixture(scope="module")
def expected(champion: dict[str, Any], images: dict[str, Any]) -> dict[str, Any]:
    """The champion's own predictions (mlflow.keras.load_model → predict) for the input images."""
    import mlflow

    from leukemia.features import load_images

    model = mlflow.keras.load_model(f"models:/{MODEL_NAME}/{champion['version']}")
    probs = model.predict(load_images(images["paths"], SIZE), verbose=0)
    return {str(p): row for p, row in zip(images["paths"], probs, strict=True)}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`python -m leukemia ...` in-process (the model loads much faster than in a new interpreter);
    logger levels the CLI changes are put back."""
    from leukemia.cli import main

    names = ["", "leukemia", "mlflow", "alembic", "botocore", "urllib3"]
    levels = {n: logging.getLogger(n).level for n in names}
    capsys.readouterr()
    try:
        code = main(list(argv))
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "leukemia", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


# --- fast checks, no TensorFlow -------------------------------------------------------------------


def test_collect_inputs_recurses_into_folders_and_reports_missing_paths(
    images: dict[str, Any], tmp_path: Path
) -> None:
    from leukemia.predict import collect_inputs

    (tmp_path / "empty").mkdir()
    single = images["paths"][0]
    sources, skipped = collect_inputs(
        [images["folder"], single, tmp_path / "gone.jpg", tmp_path / "empty"]
    )
    names = [s.name for s in sources]
    assert names == [str(p) for p in images["paths"]] + [str(single)]
    assert sources[0].read() == images["paths"][0].read_bytes()
    assert [(s.image, s.reason) for s in skipped] == [
        (str(tmp_path / "gone.jpg"), "no such file or folder"),
        (str(tmp_path / "empty"), skipped[1].reason),
    ]
    assert skipped[1].reason.startswith("no images in folder")


class UniformModel:
    """Stands in for the Keras model where only the inputs matter: 0.25 for every class."""

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        return np.full((len(pixels), len(CLASSES)), 0.25, "float32")


def noise_jpeg(side: int, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_files_and_objects_over_the_caps_are_skipped_with_the_reason_and_the_rest_scored(
    images: dict[str, Any],
    tmp_path: Path,
    aws_env: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import Image

    from leukemia.predict import LoadedModel, collect_inputs, iter_batches
    from leukemia.registry import ModelRef
    from leukemia.storage import s3_client

    small, big = images["paths"][0].read_bytes(), noise_jpeg(160)
    wide = io.BytesIO()
    Image.new("RGB", (60, 60), "white").save(wide, "PNG")  # few bytes, 3,600 pixels
    cap = max(len(small), len(wide.getvalue())) + 500
    assert len(big) > cap
    monkeypatch.setenv("LEUKEMIA_MAX_IMAGE_BYTES", str(cap))
    monkeypatch.setenv("LEUKEMIA_MAX_IMAGE_PIXELS", "3000")
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in {"small.jpg": small, "big.jpg": big, "wide.png": wide.getvalue()}.items():
        (folder / name).write_bytes(data)
    client = s3_client("aws_default")
    for name, data in {"small.jpg": small, "big.jpg": big, "grows.jpg": small}.items():
        client.put_object(Bucket=bucket, Key=f"incoming/{name}", Body=data)

    aws_env.requests.reset()
    sources, skipped = collect_inputs([folder, f"s3://{bucket}/incoming/"], client=client)
    client.put_object(Bucket=bucket, Key="incoming/grows.jpg", Body=big)  # after the listing
    model = LoadedModel(ModelRef(uri="test", pinned_uri="test"), UniformModel(), SIZE)
    predicted = []
    for batch in iter_batches(model, sources):
        predicted += [p.image for p in batch.predictions]
        skipped += batch.skipped

    uri = f"s3://{bucket}/incoming"
    assert sorted(predicted) == sorted([str(folder / "small.jpg"), f"{uri}/small.jpg"])
    reasons = {s.image: s.reason for s in skipped}
    too_large = f"too large: {len(big):,} bytes, over the cap of {cap:,}"
    assert set(reasons) == {
        str(folder / "big.jpg"),
        str(folder / "wide.png"),
        f"{uri}/big.jpg",
        f"{uri}/grows.jpg",
    }
    for name in (str(folder / "big.jpg"), f"{uri}/big.jpg", f"{uri}/grows.jpg"):
        assert too_large in reasons[name] and "LEUKEMIA_MAX_IMAGE_BYTES" in reasons[name]
    assert "60x60 = 3,600 pixels, over the cap of 3,000" in reasons[str(folder / "wide.png")]
    assert not any(s.transient for s in skipped)
    assert aws_env.requests.counts["GET"] == 2  # big.jpg was never downloaded; grows.jpg was cut


def test_prediction_rows_carry_class_probabilities_call_set_and_referral() -> None:
    from leukemia.predict import Prediction

    p = Prediction("a.jpg", "Pre", (0.01, 0.02, 0.95, 0.02), "3")
    assert p.malignant and p.call == "malignant" and p.confidence == 0.95
    assert p.prediction_set == ("Pre",) and not p.refer  # no set given: the predicted class
    assert p.as_dict()["probabilities"] == dict(zip(CLASSES, (0.01, 0.02, 0.95, 0.02), strict=True))
    assert p.as_row() == {
        "image": "a.jpg",
        "class": "Pre",
        "Benign": 0.01,
        "Early": 0.02,
        "Pre": 0.95,
        "Pro": 0.02,
        "malignant": "true",
        "model_version": "3",
        "confidence": 0.95,
        "prediction_set": "Pre",
        "refer": "false",
        "refer_reason": "",
        "overlay": "",
        "ood_score": "",  # no drift reference: no OOD score
    }
    assert Prediction("b.jpg", "Benign", (0.9, 0.05, 0.03, 0.02), "3").call == "benign"
    mixed = Prediction(
        "c.jpg", "Benign", (0.6, 0.1, 0.3, 0.0), "3", ("Benign", "Pre"), True, "why", "k.png"
    )
    assert {k: mixed.as_dict()[k] for k in ("prediction_set", "refer", "refer_reason")} == {
        "prediction_set": ["Benign", "Pre"],
        "refer": True,
        "refer_reason": "why",
    }
    row = mixed.as_row()
    assert (row["prediction_set"], row["refer"], row["overlay"]) == ("Benign|Pre", "true", "k.png")
    drifted = mixed.referred_for("batch drifted")
    assert (drifted.refer, drifted.refer_reason) == (True, "why; batch drifted")
    assert p.referred_for("batch drifted").refer_reason == "batch drifted"


class FixedModel:
    """Stands in for the Keras model: the same probabilities for every image."""

    def __init__(self, probabilities: tuple[float, ...]) -> None:
        self.probabilities = np.asarray(probabilities, "float32")

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        return np.tile(self.probabilities, (len(pixels), 1))


def test_sets_and_referrals_follow_the_models_threshold_and_external_reasons(
    images: dict[str, Any],
) -> None:
    from dataclasses import replace

    from leukemia.calibration import Calibration
    from leukemia.predict import LoadedModel, collect_inputs, iter_batches
    from leukemia.registry import ModelRef

    calibration = Calibration(1.5, 0.7, 0.9, 40, "cv", 0.1, 0.05, 0.3, 0.25)
    sources, _ = collect_inputs(images["paths"][:3])

    def run(cal: Calibration | None, reasons: tuple[str, ...] = ()) -> list[Any]:
        probs = (0.05, 0.02, 0.55, 0.38)  # Pro: 0.38 ≥ 1 - 0.7, not ≥ 1 - 0.5
        model = LoadedModel(ModelRef("test", "test"), FixedModel(probs), SIZE, cal)
        batches = iter_batches(model, sources, 2, external_reasons=reasons)
        return [p for batch in batches for p in batch.predictions]

    referred = run(calibration)
    assert [(p.label, p.prediction_set, p.refer, p.refer_reason) for p in referred] == [
        ("Pre", ("Pre", "Pro"), True, "uncertain between Pre|Pro")
    ] * 3
    assert referred[0].as_row()["confidence"] == pytest.approx(0.55)
    for p in run(replace(calibration, threshold=0.5)) + run(None):
        assert (p.prediction_set, p.refer, p.refer_reason) == (("Pre",), False, "")
    drift = "batch drifted: brightness 4.2 SD off training"
    for p in run(None, (drift,)):  # an external reason refers every image, set or not
        assert (p.prediction_set, p.refer, p.refer_reason) == (("Pre",), True, drift)
    for p in run(calibration, (drift,)):
        assert p.refer and p.refer_reason == f"uncertain between Pre|Pro; {drift}"


def test_model_shape_check_names_what_is_wrong() -> None:
    from types import SimpleNamespace

    from leukemia.predict import PredictionError, check_model_shape

    assert (
        check_model_shape(
            SimpleNamespace(input_shape=(None, 224, 224, 3), output_shape=(None, 4)), "m"
        )
        == 224
    )
    for inputs, outputs in [
        ((None, 8), (None, 4)),
        ((None, 48, 48, 1), (None, 4)),
        ((None, 48, 48, 3), (None, 2)),
    ]:
        with pytest.raises(PredictionError, match=r"expected square RGB images \(None, S, S, 3\)"):
            check_model_shape(SimpleNamespace(input_shape=inputs, output_shape=outputs), "m")


def test_unreachable_tracking_server_exits_2_in_one_line(images: dict[str, Any]) -> None:
    out = run_subprocess("predict", str(images["folder"]), MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: cannot reach MLflow at http://127.0.0.1:9: Connection refused. Start the tracking "
        "server or set MLFLOW_TRACKING_URI to one that is up"
    ]


def test_missing_tracking_store_says_to_train_first(
    images: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    code, out, err = run_cli(capsys, "predict", str(images["folder"]))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: no MLflow database at {tmp_path / 'none.db'}: run the training DAG first (it creates "
        "the store and registers the model), or set MLFLOW_TRACKING_URI to your tracking server"
    ]
    assert not (tmp_path / "none.db").exists()


# --- the CLI against a registered champion ------------------------------------------------------


@pytest.mark.slow
def test_missing_alias_exits_2_in_one_line(
    champion: dict[str, Any],
    images: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run_subprocess(
        "predict", str(images["folder"]), "--model", f"models:/{MODEL_NAME}@staging"
    )
    assert out.returncode == 2 and out.stdout == ""
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: no model version has alias staging in {MODEL_NAME} (MLflow at "
        f"{os.environ['MLFLOW_TRACKING_URI']}): run the training DAG (leukemia_training) first, or pass "
        "--model with another model URI"
    ]
    monkeypatch.setenv("LEUKEMIA_MODEL_NAME", "no-such-model")
    code, _, err = run_cli(capsys, "predict", str(images["folder"]))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: registered model no-such-model does not exist")


@pytest.mark.slow
def test_json_and_csv_equal_the_models_own_predictions(
    champion: dict[str, Any],
    images: dict[str, Any],
    expected: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(
        capsys, "predict", str(images["folder"]), "--format", "json", "--batch-size", "4"
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [r["image"] for r in rows] == list(expected)  # every image, in order, across 3 batches
    for row in rows:
        probs = [row["probabilities"][c] for c in CLASSES]
        np.testing.assert_allclose(probs, expected[row["image"]], rtol=1e-5, atol=1e-6)
        assert row["class"] == CLASSES[int(np.argmax(expected[row["image"]]))]
        assert row["malignant"] is (row["class"] != "Benign") and row["call"] in (
            "benign",
            "malignant",
        )
        assert row["model_version"] == champion["version"]
    assert f"scored {len(expected)} images with {MODEL_NAME} v{champion['version']}" in err

    code, out, err = run_cli(capsys, "predict", str(images["folder"]), "--format", "csv")
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert list(table[0]) == [
        *("image", "class", *CLASSES, "malignant", "model_version", "confidence"),
        *("prediction_set", "refer", "refer_reason", "overlay", "ood_score"),
    ]
    assert [r["image"] for r in table] == list(expected)
    for row in table:
        np.testing.assert_allclose(
            [float(row[c]) for c in CLASSES], expected[row["image"]], rtol=1e-5, atol=1e-6
        )
        assert row["malignant"] == ("true" if row["class"] != "Benign" else "false")
        assert float(row["confidence"]) == pytest.approx(max(expected[row["image"]]), abs=1e-5)
        assert row["class"] in row["prediction_set"].split("|") and row["overlay"] == ""


@pytest.mark.slow
def test_table_lists_every_image_in_aligned_columns(
    champion: dict[str, Any],
    images: dict[str, Any],
    expected: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(
        capsys,
        "predict",
        *map(str, images["paths"][:5]),
        "--model",
        f"models:/{MODEL_NAME}/{champion['version']}",
    )
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["image", "class", *CLASSES, "call", "model", "set", "refer"]
    assert [line.split()[0] for line in lines] == [str(p) for p in images["paths"][:5]]
    column = header.index("class")
    assert all(
        line[column:].split()[0] == line.split()[1] for line in lines
    )  # aligned under its header
    for line in lines:
        name, label, *probs, call, version, classes, refer = line.split(maxsplit=9)
        assert label in CLASSES and version == champion["version"]
        np.testing.assert_allclose([float(p) for p in probs], expected[name], atol=6e-5)
        assert label in classes.split("|") and refer.startswith("yes: " if "|" in classes else "no")


@pytest.mark.slow
def test_a_versions_threshold_tag_gives_two_class_sets_and_referrals(
    champion: dict[str, Any],
    images: dict[str, Any],
    expected: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The set and the referral come from the `calibration_threshold` tag of the version scored:
    a threshold just above 1 - (the second probability) of one image puts two classes in its set."""
    import mlflow

    from leukemia import registry
    from leukemia.calibration import Calibration, prediction_set

    def ranked(name: str) -> list[float]:
        return sorted(expected[name], reverse=True)

    # the image whose second class is furthest from its third: the cut falls between them
    name = max(expected, key=lambda n: ranked(n)[1] - ranked(n)[2])
    threshold = 1 - (ranked(name)[1] + ranked(name)[2]) / 2
    source = registry.client().get_model_version(MODEL_NAME, champion["version"]).source
    version = str(mlflow.register_model(source, MODEL_NAME).version)
    registry.record_sha256(MODEL_NAME, version)
    calibration = Calibration(1.0, threshold, 0.9, 30, "cv", 0.1, 0.1, 0.2, 0.2)
    registry.tag_version(MODEL_NAME, version, calibration.as_tags())

    code, out, err = run_cli(
        capsys,
        "predict",
        str(images["folder"]),
        "--model",
        f"models:/{MODEL_NAME}/{version}",
        "--format",
        "json",
    )
    assert code == 0, err
    rows = {r["image"]: r for r in json.loads(out)}
    top_two = [c for c in CLASSES if expected[name][CLASSES.index(c)] >= ranked(name)[1]]
    kind = "benign or malignant" if "Benign" in top_two else "uncertain between"
    assert (rows[name]["prediction_set"], rows[name]["refer"]) == (top_two, True)
    assert rows[name]["refer_reason"] == f"{kind} {'|'.join(top_two)}"
    for row in rows.values():  # every row: its own probabilities at the version's threshold
        probs = [row["probabilities"][c] for c in CLASSES]
        assert row["prediction_set"] == list(prediction_set(probs, threshold))
        assert row["refer"] is (len(row["prediction_set"]) > 1)
    assert "no conformal threshold" not in err
    assert f"referred {sum(r['refer'] for r in rows.values())}" in err


@pytest.mark.slow
def test_unreadable_images_are_skipped_with_reasons_and_the_rest_scored(
    champion: dict[str, Any],
    images: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = [shutil.copy(p, tmp_path / f"good-{i}.jpg") for i, p in enumerate(images["paths"][:3])]
    (tmp_path / "corrupt.jpg").write_bytes(images["paths"][0].read_bytes()[:200])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    code, out, err = run_cli(
        capsys, "predict", str(tmp_path), str(tmp_path / "missing.jpg"), "--format", "json"
    )
    assert code == 1
    assert sorted(r["image"] for r in json.loads(out)) == sorted(map(str, good))
    assert f"skipped {tmp_path / 'corrupt.jpg'}: corrupt or truncated image" in err
    assert f"skipped {tmp_path / 'empty.png'}: empty object (0 bytes)" in err
    assert f"skipped {tmp_path / 'text.jpg'}: not an image: Pillow cannot identify it" in err
    assert f"skipped {tmp_path / 'missing.jpg'}: no such file or folder" in err
    assert "skipped 4" in err and "Traceback" not in err


@pytest.mark.slow
def test_wrong_input_shape_exits_2(
    champion: dict[str, Any], images: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import keras
    import mlflow

    inputs = keras.Input((8,))
    tiny = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(inputs))
    with mlflow.start_run():
        uri = mlflow.keras.log_model(tiny, name="model", pip_requirements=["keras"]).model_uri
    code, out, err = run_cli(capsys, "predict", str(images["folder"]), "--model", uri)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"warning: {uri} is not a registered version of leukemia-classifier: its file is "
        "unverified (no recorded sha256, no gate); use it for ad-hoc checks only",
        f"error: model {uri} maps (None, 8) to (None, 4): expected square RGB images (None, S, S, 3) in "
        "and 4 class probabilities (Benign, Early, Pre, Pro) out; pass a leukemia-classifier model URI",
    ]


@pytest.mark.slow
def test_s3_inputs_are_read_through_the_connection(
    champion: dict[str, Any],
    images: dict[str, Any],
    expected: dict[str, Any],
    bucket: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from leukemia.storage import s3_client

    client = s3_client("aws_default")
    keys = []
    for i, path in enumerate(images["paths"][:4]):
        keys.append(f"incoming/day-1/{i}-{path.name}")
        client.put_object(Bucket=bucket, Key=keys[-1], Body=path.read_bytes())
    client.put_object(
        Bucket=bucket, Key="incoming-other/x.jpg", Body=images["paths"][0].read_bytes()
    )
    client.put_object(Bucket=bucket, Key="incoming/day-1/broken.jpg", Body=b"\xff\xd8 not really")
    code, out, err = run_cli(
        capsys,
        "predict",
        f"s3://{bucket}/incoming",
        f"s3://{bucket}/{keys[0]}",
        f"s3://{bucket}/nothing/",
        "--format",
        "json",
    )
    assert code == 1
    rows = json.loads(out)
    assert [r["image"] for r in rows] == [f"s3://{bucket}/{k}" for k in sorted(keys)] + [
        f"s3://{bucket}/{keys[0]}"
    ]
    by_key = {f"s3://{bucket}/{k}": str(p) for k, p in zip(keys, images["paths"][:4], strict=True)}
    for row in rows:
        np.testing.assert_allclose(
            [row["probabilities"][c] for c in CLASSES],
            expected[by_key[row["image"]]],
            rtol=1e-5,
            atol=1e-6,
        )
    assert f"skipped s3://{bucket}/incoming/day-1/broken.jpg: not an image" in err
    assert f"skipped s3://{bucket}/nothing/: no images under s3://{bucket}/nothing/" in err


@pytest.mark.slow
def test_explain_writes_an_overlay_per_image_and_a_contact_sheet(
    champion: dict[str, Any],
    images: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from PIL import Image

    out_dir = tmp_path / "cam"
    code, out, err = run_cli(
        capsys,
        "predict",
        *map(str, images["paths"][:3]),
        "--explain",
        str(out_dir),
        "--format",
        "csv",
    )
    assert code == 0, err
    overlays = sorted(out_dir.glob("*_gradcam.png"))
    assert [p.name.split("_", 1)[1] for p in overlays] == [
        f"{p.stem}_gradcam.png" for p in images["paths"][:3]
    ]
    with Image.open(overlays[0]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert [r["overlay"] for r in csv.DictReader(io.StringIO(out))] == list(map(str, overlays))
    assert (out_dir / "contact_sheet.png").stat().st_size > 1000
    assert "contact_sheet.png" in err
