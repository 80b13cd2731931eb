"""MLflow tracking: one run per configuration with params, metrics, figures and its head (not the
shared trunk); the full model assembled for the registered run only; selection by validation;
retried tasks leave one finished run; the grid's summary run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import clone_workdir, store_at

from leukemia.features import load_images
from leukemia.model import ModelConfig
from leukemia.runs import train_folder
from leukemia.training import TrainConfig

SIZE = 48
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_once(smear_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One configuration trained with the defaults (5-fold CV, augmented copies) for the module."""
    workdir = tmp_path_factory.mktemp("tracking")
    cfg = TrainConfig(optimizer="adam", batch_size=8, epochs=3, model=ModelConfig(SIZE, "none"))
    tags = {"airflow_run_id": "manual__1", "airflow_map_index": "0"}
    with store_at(workdir):
        done = train_folder(smear_dir, cfg, workdir, (0.5, 0.25, 0.25), "float32", tags=tags)
    return {"workdir": workdir, "cfg": cfg, **done}


@pytest.fixture()
def trained(trained_once: dict, mlflow_env: Path) -> dict:
    """The module's trained state in this test's own copy of the store (a test may write to it)."""
    import mlflow

    from leukemia import tracking

    source = trained_once["workdir"]
    clone_workdir(source, mlflow_env)
    tracking.setup()  # MLflow pointed at the copy
    info = replace(
        trained_once["split"], path=trained_once["split"].path.replace(str(source), str(mlflow_env))
    )
    result = trained_once["result"]
    return {
        "result": result,
        "run": mlflow.get_run(result.run_id),
        "info": info,
        "rows": trained_once["rows"],
        "cache": str(trained_once["features"].cache_dir).replace(str(source), str(mlflow_env)),
        "cfg": trained_once["cfg"],
    }


def test_run_holds_params_metrics_and_artifacts(trained: dict) -> None:
    import mlflow

    run = trained["run"]
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert (
        params["optimizer"] == "adam"
        and params["batch_size"] == "8"
        and params["learning_rate"] == "0.001"
    )
    assert params["input_size"] == "48" and params["weights"] == "none" and params["seed"] == "42"
    assert params["head_units"] == "256,128,64" and int(params["epochs_run"]) >= 1
    assert (
        tags["dataset_digest"] == trained["info"].digest and tags["airflow_run_id"] == "manual__1"
    )
    assert metrics["val_log_loss"] >= 0 and metrics["test_log_loss"] >= 0
    for key in (
        "val_f1_macro",
        "val_accuracy",
        "test_accuracy",
        "test_precision_macro",
        "test_recall_macro",
        "test_f1_macro",
        "test_malignant_sensitivity",
        "test_benign_specificity",
    ):
        assert 0 <= metrics[key] <= 1, key
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(int(params["epochs_run"])))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {
        "confusion_matrix.png",
        "training_curves.png",
        "classification_report.txt",
        "metrics.json",
        "head",
        "cv",
        "calibration",
    }
    assert tags["split_uri"] == trained["info"].path and len(tags["head_sha256"]) == 64
    assert trained["result"].head_uri == f"runs:/{run.info.run_id}/head/head.keras"
    assert "model_uri" not in tags  # no full model for a configuration that is not registered
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name.startswith(
        "leukemia-"
    )
    assert trained["result"].mlflow_url.endswith(f"/runs/{run.info.run_id}")


def test_a_configuration_logs_its_head_not_the_shared_trunk(trained: dict) -> None:
    """The frozen VGG16 trunk (58 MB) is the same for every configuration: it is not logged."""
    from leukemia.tracking import load_head

    run_id = trained["result"].run_id
    folder = Path(trained["run"].info.artifact_uri.removeprefix("file://"))
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*.*")}
    assert sum(sizes.values()) < 2_000_000, sizes
    assert sizes["head/head.keras"] < 1_000_000
    head = load_head(run_id)
    assert head.input_shape == (None, 512) and head.output_shape == (None, 4)
    assert head.get_layer("standardize") is not None


def test_a_changed_head_is_refused(trained: dict) -> None:
    from leukemia.tracking import load_head

    folder = Path(trained["run"].info.artifact_uri.removeprefix("file://"))
    with open(folder / "head" / "head.keras", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ValueError, match="the artifact changed"):
        load_head(trained["result"].run_id)


def test_full_model_is_assembled_for_one_run_and_predicts_like_the_head(
    trained: dict, smear_dir: Path
) -> None:
    import mlflow

    from leukemia.evaluation import evaluate
    from leukemia.features import labels_to_index
    from leukemia.tracking import log_full_model

    run_id = trained["result"].run_id
    uri = log_full_model(run_id, smear_dir, trained["info"].path)
    assert log_full_model(run_id, smear_dir, trained["info"].path) == uri  # idempotent
    assert mlflow.get_run(run_id).data.tags["model_uri"] == uri
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"test_predictions.png", "split"} <= artifacts
    keras_model = mlflow.keras.load_model(uri)
    test_rows = [r for r in trained["rows"] if r["split"] == "test"]
    images = load_images([smear_dir / r["path"] for r in test_rows], SIZE)
    probs = keras_model.predict(images, verbose=0)
    assert probs.shape == (len(test_rows), 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    # the reloaded full model reproduces the test metrics logged from the head on cached features
    metrics = evaluate(labels_to_index([r["label"] for r in test_rows]), probs)["metrics"]
    assert metrics["accuracy"] == pytest.approx(trained["result"].test["accuracy"])
    pyfunc = mlflow.pyfunc.load_model(uri)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(images)), probs, atol=1e-5)
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, SIZE, SIZE, 3)


def test_run_kinds_keep_the_tag_values_stored_in_mlflow() -> None:
    from leukemia.tracking import RunKind

    stored = {"training", "refit", "ensemble", "fine_tune", "evaluation", "summary"}
    assert {k.value for k in RunKind} == stored
    assert RunKind.TRAINING == "training" and f"{RunKind.FINE_TUNE}" == "fine_tune"


def test_retry_marks_the_earlier_attempt_failed(trained: dict) -> None:
    import mlflow

    from leukemia import tracking

    tags = {"airflow_run_id": "manual__1", "airflow_map_index": "0"}
    assert tracking.fail_stale_runs(tags) == 1
    assert mlflow.get_run(trained["result"].run_id).info.status == "FAILED"
    assert tracking.fail_stale_runs({"airflow_run_id": "manual__1", "airflow_map_index": "1"}) == 0


def test_report_is_made_when_selection_failed(trained: dict, tmp_path: Path) -> None:
    """The grid's summary run still holds the table and the figure, and says nothing was registered."""
    from dataclasses import asdict

    import mlflow

    from leukemia.tracking import log_grid_summary

    out = log_grid_summary([asdict(trained["result"])], None, "manual__1")
    assert out["configurations"] == 1 and "version" not in out
    run_id = out["summary_run_id"]
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"grid_comparison.png", "grid_results.md", "grid_results.json"} <= names
    text = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/grid_results.md")).read_text()
    assert text.startswith("No model was registered")
    assert "| seed | mlp | adam | 8 |" in text  # the trained configuration's row


def test_best_run_prefers_validation_f1_then_loss() -> None:
    from types import SimpleNamespace

    from leukemia.selection import best_run

    def run(f1: float, loss: float, test: float) -> SimpleNamespace:
        metrics = {"val_f1_macro": f1, "val_log_loss": loss, "test_f1_macro": test}
        return SimpleNamespace(data=SimpleNamespace(metrics=metrics))

    runs = [run(0.8, 0.5, 0.99), run(0.9, 0.6, 0.5), run(0.9, 0.4, 0.1)]
    assert best_run(runs) is runs[2]  # test metrics never decide
    with pytest.raises(ValueError, match="no finished training runs"):
        best_run([])


def test_best_run_ranks_by_mean_cv_f1_then_cv_loss_and_falls_back_to_validation_with_k1() -> None:
    from types import SimpleNamespace

    from leukemia.selection import best_run

    def run(val_f1: float, cv_f1: float | None = None, cv_loss: float = 0.3) -> SimpleNamespace:
        metrics = {"val_f1_macro": val_f1, "val_log_loss": 0.1, "test_f1_macro": 1.0}
        if cv_f1 is not None:
            metrics |= {"cv_f1_macro_mean": cv_f1, "cv_log_loss_mean": cv_loss}
        return SimpleNamespace(data=SimpleNamespace(metrics=metrics))

    cross_validated = [run(1.0, 0.90), run(0.8, 0.95, 0.4), run(0.7, 0.95, 0.2)]
    assert best_run(cross_validated) is cross_validated[2]  # CV mean, then CV loss; val ignored
    single = [run(0.8), run(0.9), run(0.85)]
    assert best_run(single) is single[1]  # k = 1: the validation split decides
    mixed = [run(0.8, 0.99), run(0.9)]
    assert best_run(mixed) is mixed[1]  # not every run was cross-validated: one scale for all


def test_every_run_logs_its_cv_folds_and_their_mean(trained: dict) -> None:
    metrics = trained["run"].data.metrics
    k = trained["cfg"].cv_folds
    assert k == 5 and trained["run"].data.params["cv_folds"] == "5"
    f1 = [metrics[f"cv_fold{i}_val_f1_macro"] for i in range(1, k + 1)]
    assert f"cv_fold{k + 1}_val_f1_macro" not in metrics
    assert metrics["cv_f1_macro_mean"] == pytest.approx(np.mean(f1))
    assert metrics["cv_f1_macro_std"] == pytest.approx(np.std(f1))
    loss = [metrics[f"cv_fold{i}_val_log_loss"] for i in range(1, k + 1)]
    assert metrics["cv_log_loss_mean"] == pytest.approx(np.mean(loss))
    held_out = sum(metrics[f"cv_fold{i}_images"] for i in range(1, k + 1))
    assert held_out == sum(r["split"] in ("train", "val") for r in trained["rows"])
    assert trained["result"].cv["cv_f1_macro_mean"] == metrics["cv_f1_macro_mean"]
    # every train + val image's probabilities from the fold that held it out
    import mlflow

    from leukemia.features import labels_to_index

    path = mlflow.artifacts.download_artifacts(
        run_id=trained["result"].run_id, artifact_path="cv/oof_probabilities.npz"
    )
    with np.load(path) as oof:
        shas, probs = oof["sha256"].tolist(), oof["probabilities"]
    train_val = [r for r in trained["rows"] if r["split"] in ("train", "val")]
    assert sorted(shas) == sorted(r["sha256"] for r in train_val)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    label = {r["sha256"]: r["label"] for r in train_val}
    correct = int((probs.argmax(1) == labels_to_index([label[s] for s in shas])).sum())
    folds = [
        (metrics[f"cv_fold{i}_val_accuracy"], metrics[f"cv_fold{i}_images"])
        for i in range(1, k + 1)
    ]
    assert correct == round(sum(acc * n for acc, n in folds))
    assert 1 <= metrics["best_epoch"] <= int(trained["run"].data.params["epochs_run"])


def test_refit_trains_on_train_and_val_is_tagged_linked_and_registers(
    trained: dict, smear_dir: Path
) -> None:
    import keras
    import mlflow

    from leukemia import registry, runs, selection, tracking
    from leukemia.dataset import file_sha256

    selected = trained["result"].run_id
    refit = runs.refit_run(
        selected, trained["info"].path, smear_dir, trained["cache"], tags={"airflow_run_id": "r1"}
    )
    run = mlflow.get_run(refit.run_id)
    tags, params = run.data.tags, run.data.params
    assert tags["kind"] == "refit" and tags["refit"] == "true" and tags["refit_of"] == selected
    assert tags["airflow_run_id"] == "r1" and tags["dataset_digest"] == trained["info"].digest
    n_train = sum(r["split"] == "train" for r in trained["rows"])
    n_train_val = sum(r["split"] in ("train", "val") for r in trained["rows"])
    assert refit.images == n_train_val > n_train and params["train_images"] == str(n_train_val)
    kept = trained["run"].data.metrics["cv_best_epoch_mean"]  # by folds of 4/5 of train + val
    assert refit.epochs_run == max(1, round(kept * 5 / 4)) == int(params["epochs"])
    history = mlflow.MlflowClient().get_metric_history(refit.run_id, "loss")
    assert len(history) == refit.epochs_run  # a fixed epoch count: no early stopping
    assert "val_f1_macro" not in run.data.metrics and 0 <= run.data.metrics["test_f1_macro"] <= 1
    # a refit is never a grid candidate, but it can be registered
    experiment_id = tracking.setup()
    assert [r.info.run_id for r in selection.finished_runs(experiment_id)] == [selected]
    candidate = registry.register_candidate(refit.run_id, trained["info"].path, smear_dir, "r1")
    version = registry.client().get_model_version(candidate.name, candidate.version)
    assert version.run_id == refit.run_id and version.tags["run_id"] == refit.run_id
    # the refit inherits the selected run's calibration (no held-out images to fit its own)
    from leukemia.calibration import Calibration

    inherited = Calibration.from_tags(trained["run"].data.tags)
    assert Calibration.from_tags(tags) == inherited == Calibration.from_tags(version.tags)
    assert run.data.metrics["temperature"] == pytest.approx(inherited.temperature)
    assert 0 <= run.data.metrics["test_ece"] <= 1 and run.data.metrics["test_referral_rate"] == 1
    uri = f"models:/{candidate.name}/{candidate.version}"
    path = registry.keras_file(registry.download_model(uri), uri)
    assert file_sha256(path) == version.tags[registry.SHA256_TAG]
    model = keras.saving.load_model(path, safe_mode=True)
    test_rows = [r for r in trained["rows"] if r["split"] == "test"]
    probs = model.predict(load_images([smear_dir / r["path"] for r in test_rows], SIZE), verbose=0)
    from leukemia.evaluation import evaluate
    from leukemia.features import labels_to_index

    labels = labels_to_index([r["label"] for r in test_rows])
    assert evaluate(labels, probs)["metrics"]["accuracy"] == pytest.approx(refit.test["accuracy"])


def test_a_linear_head_run_registers_a_full_model_that_predicts_like_its_head(
    trained: dict, smear_dir: Path
) -> None:
    import keras
    import mlflow

    from leukemia import runs, tracking
    from leukemia.training import split_arrays

    cfg = TrainConfig(
        batch_size=8, epochs=3, cv_folds=1, model=ModelConfig(SIZE, "none", head="linear", l2=0.01)
    )
    info = trained["info"]
    result = runs.train_run(cfg, info.path, smear_dir, trained["cache"], dataset_digest="d")
    run = mlflow.get_run(result.run_id)
    assert run.data.params["head"] == "linear" and run.data.params["l2"] == "0.01"
    assert "cv_f1_macro_mean" not in run.data.metrics  # k = 1: no cross-validation
    uri = tracking.log_full_model(result.run_id, smear_dir, info.path)
    path = mlflow.artifacts.download_artifacts(uri)
    full = keras.saving.load_model(next(Path(path).rglob("*.keras")), safe_mode=True)
    head = tracking.load_head(result.run_id)
    names = ["features", "standardize", "logits", "temperature", "probabilities"]
    assert [layer.name for layer in head.layers] == names  # calibrated on the validation split
    assert run.data.tags["calibration_source"] == "val"
    test_rows = [r for r in trained["rows"] if r["split"] == "test"]
    from_pixels = full.predict(load_images([smear_dir / r["path"] for r in test_rows], SIZE))
    features = split_arrays(trained["rows"], trained["cache"], "seed")["test"][0]
    np.testing.assert_allclose(from_pixels, head.predict(features, verbose=0), atol=1e-4)


def test_a_run_is_calibrated_on_its_out_of_fold_probabilities_and_its_version_carries_it(
    trained: dict, smear_dir: Path
) -> None:
    """T is fitted on the cross-validation's out-of-fold probabilities, the logged head divides its
    logits by it, the test metrics are the calibrated head's, and the registered version holds the
    `calibration_*` tags scoring reads."""
    import json

    import mlflow

    from leukemia import calibration, registry, tracking
    from leukemia.calibration import Calibration
    from leukemia.evaluation import evaluate
    from leukemia.features import labels_to_index
    from leukemia.training import split_arrays

    run_id, rows = trained["result"].run_id, trained["rows"]
    tags, metrics = trained["run"].data.tags, trained["run"].data.metrics
    cal = Calibration.from_tags(tags)
    train_val = [r for r in rows if r["split"] in ("train", "val")]
    assert cal is not None and cal.source == "cv" and cal.images == len(train_val)
    assert cal.coverage == 0.95 and json.loads(tags["config"])["conformal_coverage"] == 0.95
    # the fit is reproducible from the logged out-of-fold probabilities
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=tracking.OOF_ARTIFACT)
    with np.load(path) as oof:
        label = {r["sha256"]: r["label"] for r in train_val}
        y_oof = labels_to_index([label[s] for s in oof["sha256"].tolist()])
        held_out = oof["probabilities"]
    refit = Calibration.fit(held_out, y_oof, 0.95, "cv")
    assert refit.temperature == pytest.approx(cal.temperature, rel=1e-3)
    assert metrics["temperature"] == pytest.approx(cal.temperature)
    assert metrics["calibration_ece_after"] == pytest.approx(cal.ece_after)
    # T minimises the NLL (18 images are too few to promise a lower ECE as well)
    nll = calibration.negative_log_likelihood
    assert nll(calibration.scale(held_out, cal.temperature), y_oof) <= nll(held_out, y_oof) + 1e-6
    # 18 held-out images are too few for 0.95 (19 needed): every test image is referred
    assert cal.threshold == metrics["conformal_threshold"] == 1.0
    assert metrics["test_referral_rate"] == 1.0 and metrics["test_mean_set_size"] == 4.0
    assert metrics["test_coverage"] == 1.0
    # the logged head is calibrated, and the logged test metrics are its own
    head = tracking.load_head(run_id)
    assert [layer.name for layer in head.layers][-3:] == ["logits", "temperature", "probabilities"]
    assert head.get_layer("temperature").scale == pytest.approx(1 / cal.temperature)
    x_test, y_test, _ = split_arrays(rows, trained["cache"], "seed")["test"]
    probs = head.predict(x_test, verbose=0)
    assert metrics["test_ece"] == pytest.approx(
        calibration.expected_calibration_error(probs, y_test), abs=1e-6
    )
    assert metrics["test_brier"] == pytest.approx(calibration.brier_score(probs, y_test), abs=1e-6)
    assert metrics["test_log_loss"] == pytest.approx(
        evaluate(y_test, probs)["metrics"]["log_loss"], abs=1e-6
    )
    assert tracking.artifact_names(run_id, "calibration") == {"reliability.png", "calibration.json"}
    candidate = registry.register_candidate(run_id, trained["info"].path, smear_dir)
    version = registry.client().get_model_version(candidate.name, candidate.version)
    assert Calibration.from_tags(version.tags) == cal
    assert candidate.metrics["test_ece"] == metrics["test_ece"]  # what the gate checks


def test_a_refit_of_a_run_trained_before_calibration_is_not_calibrated_and_says_so(
    trained: dict, smear_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    from leukemia import runs, tracking

    selected = trained["result"].run_id
    client = mlflow.MlflowClient()
    for key in [k for k in trained["run"].data.tags if k.startswith("calibration_")]:
        client.delete_tag(selected, key)
    with caplog.at_level("WARNING", logger="leukemia.runs"):
        refit = runs.refit_run(selected, trained["info"].path, smear_dir, trained["cache"])
    warned = [r.getMessage() for r in caplog.records if "no calibration" in r.getMessage()]
    assert len(warned) == 1 and selected in warned[0]
    run = mlflow.get_run(refit.run_id)
    assert not [k for k in run.data.tags if k.startswith("calibration_")]
    assert "test_ece" not in run.data.metrics and "temperature" not in run.data.metrics
    head = tracking.load_head(refit.run_id)
    assert "temperature" not in [layer.name for layer in head.layers]
