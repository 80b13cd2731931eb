"""Batch scoring of s3://<bucket>/incoming/: only what this model version has not scored, a CSV per
run, a ledger per version; and the scoring DAG end to end with dag.test() on the embedded stack."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from airflow_events import asset_events
from conftest import new_mlflow_store

from leukemia.config import CLASSES
from leukemia.ledger import ledger_key, pending, version_folder
from leukemia.scoring import CSV_COLUMNS

SIZE = 48
MODEL_NAME = "leukemia-classifier"
ROOT = Path(__file__).resolve().parents[1]


# --- fast checks ------------------------------------------------------------------------------------


def test_pending_skips_what_this_version_scored_or_rejected_unless_replaced() -> None:
    ledger = {
        "scored": {"incoming/a.jpg": {"etag": "1"}, "incoming/b.jpg": {"etag": "1"}},
        "rejected": {"incoming/bad.jpg": {"etag": "7", "reason": "not an image"}},
    }
    listing = {
        "incoming/a.jpg": "1",
        "incoming/b.jpg": "2",
        "incoming/c.jpg": "1",
        "incoming/bad.jpg": "7",
    }
    assert pending(listing, ledger) == ["incoming/b.jpg", "incoming/c.jpg"]
    assert pending(listing, {"scored": {}, "rejected": {}}) == sorted(listing)


def test_ledger_and_prediction_folders_are_per_model_version() -> None:
    assert ledger_key("3") == "predictions/ledger/v3.json"
    assert version_folder("12") == "v12"
    assert version_folder("runs:/abc/model").startswith(
        "uri-"
    )  # no registry version: a stable name


def test_no_champion_yet_means_nothing_to_score(mlflow_env: Path) -> None:
    from leukemia.registry import NoChampionError
    from leukemia.tasks.scoring_dag import champion_or_none

    assert champion_or_none() is None  # the DAG skips; the champion asset triggers it later
    with pytest.raises(NoChampionError):
        champion_or_none(f"models:/{MODEL_NAME}/7")  # a URI the user asked for must exist


# --- with a registered champion -------------------------------------------------------------------


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The pipeline's full model (48 px, no base weights, untrained head: scoring does not care how
    good it is) logged the way training logs it, registered and made champion in its own MLflow."""
    import mlflow

    from leukemia import registry, tracking
    from leukemia.model import ModelConfig, build_model

    root = tmp_path_factory.mktemp("scoring")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's artifacts land here
        mp.setenv("LEUKEMIA_DATA_DIR", str(root / "data"))
        mp.setenv("MLFLOW_TRACKING_URI", new_mlflow_store(root))
        tracking.setup()
        with mlflow.start_run():
            info = mlflow.keras.log_model(
                build_model(ModelConfig(input_size=SIZE, weights="none", variant="multiscale")),
                name="model",
                signature=tracking.model_signature(SIZE),
                pip_requirements=tracking.pip_requirements(),
            )
        version = str(mlflow.register_model(info.model_uri, MODEL_NAME).version)
        registry.record_sha256(MODEL_NAME, version)  # as promotion does: loads are verified
        registry.tag_version(MODEL_NAME, version, {registry.GATE_TAG: "passed"})
        registry.move_champion(version, "promotion", "fixture", "pytest", "test_scoring")
        yield {"version": version, "model_uri": info.model_uri, "run_id": info.run_id}


def _upload(client: Any, bucket: str, paths: list[Path], prefix: str = "incoming/") -> list[str]:
    keys = []
    for path in paths:
        keys.append(f"{prefix}{path.parent.name.lower()}/{path.name}")
        client.put_object(Bucket=bucket, Key=keys[-1], Body=path.read_bytes())
    return keys


def _csvs(client: Any, bucket: str, version: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"predictions/v{version}/")
    return sorted(o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".csv"))


def _rows(client: Any, bucket: str, key: str) -> list[dict[str, str]]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return list(csv.DictReader(io.StringIO(body)))


@pytest.mark.slow
def test_score_incoming_records_rejects_rescoring_replaced_images_and_explains(
    champion: dict[str, Any], bucket: str, smear_dir: Path
) -> None:
    from leukemia.scoring import score_incoming
    from leukemia.storage import s3_client

    client = s3_client("aws_default")
    keys = _upload(
        client, bucket, [sorted((smear_dir / c).iterdir())[0] for c in ("Benign", "Pro")]
    )
    client.put_object(Bucket=bucket, Key="incoming/broken.jpg", Body=b"GIF89a nope")
    client.put_object(Bucket=bucket, Key="incoming/readme.txt", Body=b"ignored: not an image name")

    first = score_incoming(bucket, "incoming", explain=True)
    assert (first.listed, first.scored, first.skipped, first.failed) == (3, 2, 1, 0)
    assert first.skipped_keys == [
        {"key": "incoming/broken.jpg", "reason": "not an image: Pillow cannot identify it"}
    ]
    rows = _rows(client, bucket, first.predictions_uri.removeprefix(f"s3://{bucket}/"))
    assert [r["key"] for r in rows] == keys and list(rows[0]) == list(CSV_COLUMNS)
    gradcam = client.list_objects_v2(
        Bucket=bucket, Prefix=first.gradcam_uri.removeprefix(f"s3://{bucket}/")
    )
    assert len([o for o in gradcam["Contents"] if o["Key"].endswith("_gradcam.png")]) == 2
    assert any(o["Key"].endswith("/contact_sheet.png") for o in gradcam["Contents"])
    ledger = json.loads(
        client.get_object(Bucket=bucket, Key=ledger_key(champion["version"]))["Body"].read()
    )
    assert sorted(ledger["scored"]) == keys and list(ledger["rejected"]) == ["incoming/broken.jpg"]
    assert ledger["model_version"] == champion["version"]

    # replacing an image (new ETag) scores it again; the broken one is not retried until replaced
    client.put_object(
        Bucket=bucket, Key=keys[0], Body=sorted((smear_dir / "Early").iterdir())[1].read_bytes()
    )
    second = score_incoming(bucket, "incoming/")
    assert (second.already_scored, second.scored, second.skipped) == (2, 1, 0)
    assert [
        r["key"]
        for r in _rows(client, bucket, second.predictions_uri.removeprefix(f"s3://{bucket}/"))
    ] == keys[:1]


def _keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _calibrated(champion: dict[str, Any], threshold: float) -> str:
    """The URI of another gated version of the champion's model that carries a calibration with
    this conformal threshold (1.0: every class in every set, so every image is referred)."""
    from leukemia import registry
    from leukemia.calibration import Calibration

    cal = Calibration(1.0, threshold, 0.9, 30, "cv", 0.1, 0.1, 0.2, 0.2)
    version = _register_again(champion, {registry.GATE_TAG: "passed", **cal.as_tags()})
    return f"models:/{MODEL_NAME}/{version}"


@pytest.mark.slow
def test_referred_images_get_overlays_and_are_queued_once_across_runs_and_versions(
    champion: dict[str, Any], bucket: str, smear_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib

    from leukemia.calibration import prediction_set
    from leukemia.scoring import score_incoming
    from leukemia.storage import s3_client

    caplog.set_level(logging.INFO, logger="leukemia")
    client = s3_client("aws_default")
    _upload(client, bucket, [sorted((smear_dir / c).iterdir())[0] for c in CLASSES])

    # the champion has no calibration tags: sets of one class, nothing referred, no overlay
    plain = score_incoming(bucket, "incoming")
    assert (plain.scored, plain.referred, plain.queued, plain.gradcam_uri) == (4, 0, 0, "")
    assert "has no conformal threshold: refer only for external reasons" in caplog.text
    # nor a drift reference (registered before the watch): scored, one warning, no decision
    assert "keeps no drift reference: scored without out-of-distribution flags" in caplog.text
    assert plain.drift["decision"] == "no reference: no drift decision"
    rows = _rows(client, bucket, plain.predictions_uri.removeprefix(f"s3://{bucket}/"))
    for row in rows:
        assert (row["prediction_set"], row["refer"], row["refer_reason"], row["overlay"]) == (
            row["class"],
            "false",
            "",
            "",
        )
        assert float(row["confidence"]) == max(float(row[c]) for c in CLASSES)
    assert _keys(client, bucket, "review/") == []

    # a version whose threshold falls in the widest gap between the images' second probabilities
    second = {r["key"]: sorted(float(r[c]) for c in CLASSES)[-2] for r in rows}
    ordered = sorted(second.values())
    low, high = max(zip(ordered[:-1], ordered[1:], strict=True), key=lambda pair: pair[1] - pair[0])
    threshold = 1 - (low + high) / 2
    referred = sorted(k for k, p in second.items() if p >= high)
    uri = _calibrated(champion, threshold)
    first = score_incoming(bucket, "incoming", model_uri=uri)
    assert (first.scored, first.referred, first.queued) == (4, len(referred), len(referred))
    assert f"{len(referred)} referred, {len(referred)} newly queued for review" in caplog.text
    rows = _rows(client, bucket, first.predictions_uri.removeprefix(f"s3://{bucket}/"))
    assert list(rows[0]) == list(CSV_COLUMNS)
    overlays = first.gradcam_uri.removeprefix(f"s3://{bucket}/")
    for row in rows:
        classes = prediction_set([float(row[c]) for c in CLASSES], threshold)
        assert row["prediction_set"] == "|".join(classes)
        assert (row["refer"] == "true") is (row["key"] in referred) is (len(classes) > 1)
        if row["key"] in referred:
            assert row["refer_reason"].endswith(row["prediction_set"])
            assert row["overlay"].startswith(overlays) and row["overlay"] in _keys(
                client, bucket, overlays
            )
        else:
            assert row["refer_reason"] == "" and row["overlay"] == ""
    queue = _keys(client, bucket, "review/queue/")
    digests = [
        hashlib.sha256(client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in referred
    ]
    assert queue == sorted(f"review/queue/{d.hexdigest()}.json" for d in digests)
    ledger = json.loads(
        client.get_object(Bucket=bucket, Key=ledger_key(uri.rsplit("/", 1)[1]))["Body"].read()
    )
    entry = ledger["scored"][referred[0]]
    assert entry["refer"] is True and entry["prediction_set"].count("|") >= 1

    # a retry after a kill between the queue and the ledger scores everything again: queued once
    client.delete_object(Bucket=bucket, Key=ledger_key(uri.rsplit("/", 1)[1]))
    retry = score_incoming(bucket, "incoming", model_uri=uri, explain="none")
    assert (retry.scored, retry.referred, retry.queued, retry.gradcam_uri) == (
        4,
        len(referred),
        0,
        "",
    )
    # a second version with the same threshold refers the same images: not queued again
    again = score_incoming(
        bucket, "incoming", model_uri=_calibrated(champion, threshold), explain="none"
    )
    assert (again.scored, again.referred, again.queued) == (4, len(referred), 0)
    assert _keys(client, bucket, "review/queue/") == queue
    assert _keys(client, bucket, "raw/") == []


@pytest.mark.slow
def test_empty_and_unreadable_batches_queue_nothing_and_one_image_is_enough(
    champion: dict[str, Any], bucket: str, smear_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from leukemia.scoring import score_incoming
    from leukemia.storage import s3_client

    caplog.set_level(logging.INFO, logger="leukemia")
    client = s3_client("aws_default")
    uri = _calibrated(champion, 1.0)  # anything scored is referred

    empty = score_incoming(bucket, "incoming", model_uri=uri)
    assert (empty.listed, empty.scored, empty.referred, empty.queued) == (0, 0, 0, 0)
    assert f"No images under s3://{bucket}/incoming/: nothing to score, nothing referred" in (
        caplog.text
    )
    client.put_object(Bucket=bucket, Key="incoming/broken.jpg", Body=b"GIF89a nope")
    client.put_object(Bucket=bucket, Key="incoming/text.png", Body=b"hello")
    caplog.clear()
    bad = score_incoming(bucket, "incoming", model_uri=uri)
    assert (bad.listed, bad.scored, bad.skipped, bad.queued, bad.predictions_uri) == (
        2,
        0,
        2,
        0,
        "",
    )
    assert "None of the 2 new images could be scored" in caplog.text
    assert "no CSV written, nothing referred" in caplog.text
    version = uri.rsplit("/", 1)[1]
    assert _keys(client, bucket) == sorted(
        ["incoming/broken.jpg", "incoming/text.png", ledger_key(version)]
    )  # nothing in review/, raw/ or predictions/v<version>/

    key = _upload(client, bucket, [sorted((smear_dir / "Early").iterdir())[2]])[0]
    single = score_incoming(bucket, "incoming", model_uri=uri)
    assert (single.scored, single.referred, single.queued) == (1, 1, 1)
    row = _rows(client, bucket, single.predictions_uri.removeprefix(f"s3://{bucket}/"))[0]
    assert row["key"] == key and row["prediction_set"] == "|".join(CLASSES)
    assert row["refer_reason"] == f"benign or malignant {'|'.join(CLASSES)}"
    assert len(_keys(client, bucket, "review/queue/")) == 1


@pytest.fixture(scope="module")
def scoring_dag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "leukemia_scoring.py"))
    assert bag.import_errors == {}
    return bag.dags["leukemia_scoring"]


def test_scoring_dag_structure(scoring_dag: Any) -> None:
    assert {t.task_id: sorted(t.downstream_task_ids) for t in scoring_dag.tasks} == {
        "resolve_model": ["score_new_images"],
        "score_new_images": [],
    }
    assert scoring_dag.tags and set(scoring_dag.tags) == {"leukemia", "scoring"}
    for task in scoring_dag.tasks:
        assert task.retries == 3 and task.retry_exponential_backoff
    condition = scoring_dag.timetable.asset_condition  # champion OR incoming images
    assert type(condition).__name__ == "AssetAny"
    assert {a.name for a in condition.objects} == {"leukemia_champion", "leukemia_incoming_images"}
    params = scoring_dag.params.dump()
    assert (
        params["incoming_prefix"] == "incoming/"
        and params["explain"] == "referred"
        and params["batch_size"] == 32
    )
    for old_conf in (True, False):  # a run conf of the older boolean form still validates
        assert scoring_dag.params.get_param("explain").resolve(old_conf) is old_conf
    outlets = scoring_dag.get_task("score_new_images").outlets  # the event only when queued
    assert [(type(o).__name__, o.name) for o in outlets] == [
        ("AssetAlias", "leukemia_referrals_queued")
    ]


def test_explain_accepts_the_modes_and_the_older_boolean() -> None:
    from leukemia.scoring import explain_mode

    cases = {True: "all", False: "none", "true": "all", "False": "none", None: "referred"}
    for value, mode in {**cases, "referred": "referred", "all": "all", "none": "none"}.items():
        assert explain_mode(value) == mode
    with pytest.raises(ValueError, match="explain must be one of referred, all, none"):
        explain_mode("some")


@pytest.mark.slow
def test_scoring_dag_scores_new_images_once(
    airflow_db: Path, scoring_dag: Any, champion: dict[str, Any], bucket: str, smear_dir: Path
) -> None:
    from leukemia.storage import s3_client

    client = s3_client("aws_default")
    first_keys = _upload(client, bucket, [sorted((smear_dir / c).iterdir())[0] for c in CLASSES])
    conf = {"bucket": bucket, "batch_size": 3}

    first = scoring_dag.test(run_conf=conf)
    assert str(first.state) == "success"
    csvs = _csvs(client, bucket, champion["version"])
    assert len(csvs) == 1
    rows = _rows(client, bucket, csvs[0])
    assert sorted(r["key"] for r in rows) == sorted(first_keys)
    for row in rows:
        probs = [float(row[c]) for c in CLASSES]
        assert row["class"] in CLASSES and row["class"] == CLASSES[int(np.argmax(probs))]
        assert sum(probs) == pytest.approx(1, abs=1e-4)
        assert row["malignant"] == ("false" if row["class"] == "Benign" else "true")
        assert row["model_version"] == champion["version"] and row["scored_at"].endswith("+00:00")

    second = scoring_dag.test(run_conf=conf)  # nothing new: no CSV
    assert str(second.state) == "success"
    assert _csvs(client, bucket, champion["version"]) == csvs

    new_key = _upload(client, bucket, [sorted((smear_dir / "Pre").iterdir())[1]])
    third = scoring_dag.test(run_conf=conf)
    assert str(third.state) == "success"
    later = [k for k in _csvs(client, bucket, champion["version"]) if k not in csvs]
    assert len(later) == 1
    assert [r["key"] for r in _rows(client, bucket, later[0])] == new_key
    for run in (first, second, third):  # the champion refers nothing: no referrals event
        assert asset_events("leukemia_referrals", run.run_id) == []

    # a calibrated version that refers every image, with the older boolean `explain` (none)
    calibrated = {**conf, "model_uri": _calibrated(champion, 1.0), "explain": False}
    fourth = scoring_dag.test(run_conf=calibrated)
    assert str(fourth.state) == "success"
    [event] = asset_events("leukemia_referrals", fourth.run_id)
    assert (event["queued"], event["referred"]) == (5, 5)
    assert len(_keys(client, bucket, "review/queue/")) == 5
    assert event["predictions_uri"].startswith(f"s3://{bucket}/predictions/v")
    stem = event["predictions_uri"].removeprefix(f"s3://{bucket}/").removesuffix(".csv")
    # explain false: no Grad-CAM folder; the drift report beside the CSV (here: no reference)
    assert _keys(client, bucket, stem) == [f"{stem}-drift.json", f"{stem}.csv"]


def _register_again(champion: dict[str, Any], tags: dict[str, str]) -> str:
    """Another version of the champion's model, registered (and hashed) as the pipeline does."""
    import mlflow

    from leukemia import registry

    version = str(mlflow.register_model(champion["model_uri"], MODEL_NAME).version)
    registry.record_sha256(MODEL_NAME, version)
    registry.tag_version(MODEL_NAME, version, tags)
    return version


@pytest.mark.slow
def test_scoring_refuses_unregistered_uris_and_ungated_versions_and_writes_nothing(
    champion: dict[str, Any], bucket: str, smear_dir: Path
) -> None:
    """Issue 22 #2: a `runs:/` or `models:/m-…` URI had no hash to check, and a rejected version
    scored into predictions/."""
    from leukemia import registry
    from leukemia.scoring import score_incoming
    from leukemia.storage import s3_client
    from leukemia.tasks.scoring_dag import champion_or_none

    client = s3_client("aws_default")
    _upload(client, bucket, [sorted((smear_dir / "Pro").iterdir())[0]])
    failed = _register_again(champion, {registry.GATE_TAG: "failed"})
    rejected = _register_again(champion, {registry.GATE_TAG: "passed", "decision": "rejected"})
    ungated = _register_again(champion, {})
    refused = {
        champion["model_uri"]: "not models:/m-",
        f"runs:/{champion['run_id']}/model": "not runs:/",
        f"models:/{MODEL_NAME}/{failed}": "failed the promotion gate",
        f"models:/{MODEL_NAME}/{rejected}": "was rejected",
        f"models:/{MODEL_NAME}/{ungated}": "has not passed the promotion gate",
        "models:/another-model/1": "not models:/another-model",
    }
    for uri, why in refused.items():
        with pytest.raises(registry.ModelVerificationError, match=why.replace("/", "/")):
            champion_or_none(uri)
        with pytest.raises(registry.ModelVerificationError):
            score_incoming(bucket, "incoming", model_uri=uri)
    listing = client.list_objects_v2(Bucket=bucket, Prefix="predictions/")
    assert listing.get("KeyCount", 0) == 0  # nothing reached the shared prediction store
    assert champion_or_none(f"models:/{MODEL_NAME}@champion")["version"] == champion["version"]


@pytest.mark.slow
def test_a_version_registered_by_another_login_is_never_loaded_or_promoted(
    champion: dict[str, Any],
) -> None:
    """Issue 22 #1: only the training login's versions load, whatever their tags claim."""
    from leukemia import registry

    forged = _register_again(champion, {registry.GATE_TAG: "passed"})
    registry.tag_version(MODEL_NAME, forged, {registry.REGISTERED_BY_TAG: "leukemia-scoring"})
    ref = registry.version_ref(MODEL_NAME, forged)
    with pytest.raises(
        registry.ModelVerificationError,
        match="registered by leukemia-scoring, not by the training login 'local'",
    ):
        registry.load_keras(ref)
    with pytest.raises(registry.ModelVerificationError, match="registered by leukemia-scoring"):
        registry.move_champion(forged, "promotion", "forged", "mallory", "test")
    registry.client().delete_model_version_tag(MODEL_NAME, forged, registry.REGISTERED_BY_TAG)
    with pytest.raises(registry.ModelVerificationError, match="without a registered_by tag"):
        registry.load_keras(ref)
    assert str(registry.current_champion(MODEL_NAME).version) == champion["version"]


@pytest.mark.slow
def test_a_deleted_champion_alias_stops_every_reader_until_it_is_rolled_back(
    champion: dict[str, Any],
) -> None:
    """Issue 22 #4: a deleted @champion read as "no champion yet" made scoring skip silently."""
    from leukemia import registry
    from leukemia.tasks.scoring_dag import champion_or_none

    version = champion["version"]
    registry.client().delete_registered_model_alias(MODEL_NAME, "champion")
    try:
        expected = f"records v{version} as champion.*champion rollback --to {version}"
        with pytest.raises(registry.ChampionMissing, match=expected):
            champion_or_none()  # scoring: fails, does not skip
        with pytest.raises(registry.ChampionMissing):
            registry.current_champion(MODEL_NAME)  # what the gate and the promotion read
        with pytest.raises(registry.ChampionMissing):
            registry.resolve_model(None)  # what predict and the CLI read
    finally:
        registry.rollback(version, "restored after deletion", "pytest", "test_scoring")
    assert champion_or_none()["version"] == version
    assert registry.history(MODEL_NAME)[-1].reason == "restored after deletion"


def _shifted_copies(paths: list[Path], out: Path) -> list[Path]:
    """The images with another stain and camera: colours scaled (R down, B up), a slight blur."""
    from PIL import Image, ImageFilter

    copies = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype="float32")
        shifted = np.clip(pixels * np.asarray([0.7, 0.9, 1.3]), 0, 255).astype("uint8")
        target = out / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shifted).filter(ImageFilter.GaussianBlur(1)).save(target)
        copies.append(target)
    return copies


@pytest.mark.slow
def test_drift_watch_refers_a_shifted_batch_records_it_and_leaves_an_unshifted_one_alone(
    champion: dict[str, Any], bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leukemia import predict, registry, watch
    from leukemia.dev.synthetic import generate
    from leukemia.drift import Reference
    from leukemia.features import load_images
    from leukemia.model import feature_width
    from leukemia.scoring import score_incoming
    from leukemia.storage import s3_client

    monkeypatch.setenv("LEUKEMIA_DRIFT_MIN_BATCH", "20")
    generate(tmp_path / "train", n_per_class=10, size=SIZE, seed=11)
    generate(tmp_path / "new", n_per_class=6, size=SIZE, seed=12)
    train = sorted((tmp_path / "train").glob("*/*.jpg"))
    model = predict.load_model(f"models:/{MODEL_NAME}/{champion['version']}").model
    two = watch.features_model(model, feature_width("multiscale"))
    pixels = load_images(train, SIZE)
    features, probabilities = two.predict(pixels, verbose=0)
    np.testing.assert_allclose(probabilities, model.predict(pixels, verbose=0), atol=1e-5)
    # the batch side is matched by *predicted* class: this untrained head's predictions are not
    # the true labels, so the reference is labelled with them (a trained model's agree with both)
    labels = probabilities.argmax(axis=1)
    reference = Reference.fit(features, labels, fpr=0.05)
    background = Reference.fit(watch.background_features(pixels), labels, fpr=0.05)
    tags = watch.log_references(champion["run_id"], reference, background)
    assert int(tags[watch.REFERENCE_BYTES_TAG]) > 0
    version = _register_again(champion, {registry.GATE_TAG: "passed", **tags})
    uri = f"models:/{MODEL_NAME}/{version}"
    client = s3_client("aws_default")
    new = sorted((tmp_path / "new").glob("*/*.jpg"))

    _upload(client, bucket, new, prefix="incoming/same/")
    same = score_incoming(bucket, "incoming/same/", model_uri=uri, explain="none")
    assert same.drift["decision"] == "no drift" and same.drift["test"]["p_value"] > 0.05
    for row in _rows(client, bucket, same.predictions_uri.removeprefix(f"s3://{bucket}/")):
        assert row["batch_drift"] == "no drift" and float(row["ood_score"]) > 0
        assert "batch drifted" not in row["refer_reason"]

    _upload(client, bucket, _shifted_copies(new, tmp_path / "shifted"), prefix="incoming/moved/")
    moved = score_incoming(bucket, "incoming/moved/", model_uri=uri, explain="none")
    assert moved.drift["decision"] == "drift" and moved.drift["test"]["p_value"] <= 0.01
    assert moved.drift["test"]["statistic"] > 0.9 and moved.referred == moved.scored == 24
    csv_key = moved.predictions_uri.removeprefix(f"s3://{bucket}/")
    for row in _rows(client, bucket, csv_key):
        assert row["refer"] == "true" and row["batch_drift"] == "drift"
        assert "batch drifted (AUC" in row["refer_reason"]
    # the stain and blur live in the background too: the background test says acquisition
    assert "background: shifted too: acquisition" in moved.drift["line"]
    report = json.loads(
        client.get_object(Bucket=bucket, Key=f"{csv_key[:-4]}-drift.json")["Body"].read()
    )
    assert report["csv"] == csv_key and report["decision"] == "drift"
    ledger = json.loads(client.get_object(Bucket=bucket, Key=ledger_key(version))["Body"].read())
    assert ledger["batches"][csv_key]["line"] == moved.drift["line"]
    assert same.predictions_uri.removeprefix(f"s3://{bucket}/") in ledger["batches"]

    # fewer images than the test can judge: no decision, said so; OOD scores still given
    _upload(client, bucket, new[:5], prefix="incoming/few/")
    few = score_incoming(bucket, "incoming/few/", model_uri=uri, explain="none")
    assert few.drift["decision"] == "too few images (n < 20): no decision"
    rows = _rows(client, bucket, few.predictions_uri.removeprefix(f"s3://{bucket}/"))
    assert len(rows) == 5 and all(float(r["ood_score"]) > 0 for r in rows)
