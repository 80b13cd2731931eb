"""The ensemble of the top-k heads: chosen only when it beats the best single head on held-out
probabilities (ties keep the single head); one pixels-to-softmax model with one trunk and k heads
of any variant, saved as `.keras` and loaded in safe mode; logged as an `ensemble` run whose full
model the gate's `log_full_model` builds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import clone_workdir, store_at

from leukemia.model import ModelConfig

SIZE = 32


def _onehot(labels: list[int], confidence: float = 0.9) -> np.ndarray:
    rest = (1 - confidence) / 3
    out = np.full((len(labels), 4), rest)
    out[np.arange(len(labels)), labels] = confidence
    return out


def test_ensemble_is_chosen_when_the_mean_beats_every_single_head() -> None:
    from leukemia.ensemble import choose

    y = [0, 1, 2, 3] * 3
    a, b, c = _onehot(y), _onehot(y), _onehot(y)
    a[0] = [0.1, 0.5, 0.2, 0.2]  # a errs on image 0, unsurely; b and c are sure of the truth there
    b[5] = [0.1, 0.2, 0.5, 0.2]  # b errs on image 5
    c[10] = [0.1, 0.2, 0.2, 0.5]  # c errs on image 10
    choice = choose({"a": a, "b": b, "c": c}, y)
    assert choice["choice"] == "ensemble" and choice["members"] == ["a", "b", "c"]
    assert choice["ensemble_f1_macro"] == 1.0 and choice["single_f1_macro"] < 1.0
    assert choice["best_single"] == "a" and choice["source"] == "val"  # equal scores: rank order


def test_a_tie_keeps_the_single_head() -> None:
    from leukemia.ensemble import choose

    y = [0, 1, 2, 3] * 3
    perfect = _onehot(y)
    other = _onehot(y, confidence=0.6)
    choice = choose({"first": perfect, "second": other}, y, source="cv")
    assert choice["ensemble_f1_macro"] == choice["single_f1_macro"] == 1.0
    assert choice["choice"] == "single" and choice["best_single"] == "first"
    assert choice["source"] == "cv"


def test_an_ensemble_worse_than_its_best_head_is_not_chosen() -> None:
    from leukemia.ensemble import choose

    y = [0, 1, 2, 3] * 3
    good = _onehot(y, confidence=0.4)  # right, but unsure
    bad = _onehot([1, 2, 3, 0] * 3)  # surely wrong everywhere: drags the mean to its answers
    choice = choose({"good": good, "bad": bad}, y)
    assert choice["choice"] == "single" and choice["best_single"] == "good"
    assert choice["ensemble_f1_macro"] < choice["single_f1_macro"] == 1.0


def test_top_runs_rank_by_validation_f1_then_log_loss() -> None:
    from leukemia.selection import top_runs

    results = [
        {"run_id": "a", "val": {"f1_macro": 0.90, "log_loss": 0.1}},
        {"run_id": "b", "val": {"f1_macro": 0.95, "log_loss": 0.3}},
        {"run_id": "c", "val": {"f1_macro": 0.95, "log_loss": 0.2}},
    ]
    assert [r["run_id"] for r in top_runs(results, 2)] == ["c", "b"]
    assert [r["run_id"] for r in top_runs(results, 0)] == []


def test_members_on_different_features_cannot_share_a_trunk() -> None:
    from leukemia.model import shared_trunk

    base = ModelConfig(SIZE, "none")
    assert shared_trunk([base, replace(base, variant="multiscale")]) == base
    with pytest.raises(ValueError, match="differ in"):
        shared_trunk([base, replace(base, input_size=64)])


def test_ensemble_model_averages_heads_of_both_variants_and_loads_in_safe_mode(
    tmp_path: Path,
) -> None:
    import keras

    from leukemia.model import assemble, build_ensemble, build_head, build_trunk

    cfg = ModelConfig(SIZE, "none")
    keras.utils.set_random_seed(0)
    heads = [
        ("seed", build_head(replace(cfg, variant="seed"))),
        ("multiscale", build_head(replace(cfg, variant="multiscale"))),
        ("seed", build_head(replace(cfg, variant="seed"))),
    ]
    ens = build_ensemble(cfg, heads)
    trunks = [layer for layer in ens.layers if layer.name == "vgg16_trunk"]
    assert len(trunks) == 1  # one shared trunk, not one per head
    assert {layer.name for layer in ens.layers if layer.name.startswith("pool_")} == {
        "pool_seed",
        "pool_multiscale",
    }
    pixels = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")
    probs = np.asarray(ens.predict_on_batch(pixels))
    singles = [
        np.asarray(assemble(replace(cfg, variant=v), build_trunk(cfg), h).predict_on_batch(pixels))
        for v, h in heads
    ]
    assert not np.allclose(singles[0], singles[2], atol=1e-3)  # the heads differ
    np.testing.assert_allclose(probs, np.mean(singles, axis=0), atol=1e-5)
    ens.save(tmp_path / "ensemble.keras")
    loaded = keras.saving.load_model(tmp_path / "ensemble.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict_on_batch(pixels), probs, atol=1e-6)
    # Grad-CAM explains the first head, and captions with the ensemble's own probabilities
    from leukemia.gradcam import GradCam

    heat, cam_probs = GradCam(loaded)(pixels)
    assert heat.shape == (3, SIZE, SIZE) and 0 <= heat.min() and heat.max() <= 1
    np.testing.assert_allclose(cam_probs, probs, atol=1e-5)


def test_a_head_paired_with_the_wrong_variant_is_refused() -> None:
    from leukemia.model import build_ensemble, build_head

    cfg = ModelConfig(SIZE, "none")
    seed_head = build_head(replace(cfg, variant="seed"))
    with pytest.raises(ValueError, match="pair each head with the variant"):
        build_ensemble(cfg, [("seed", seed_head), ("multiscale", seed_head)])


@pytest.fixture(scope="module")
def two_runs_once(smear_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A seed and a multiscale configuration trained on the same split and feature cache, once."""
    from dataclasses import asdict

    from leukemia.runs import train_folder, train_run
    from leukemia.training import TrainConfig

    workdir = tmp_path_factory.mktemp("ensemble")
    base = TrainConfig(
        optimizer="adam", batch_size=8, epochs=2, cv_folds=1, model=ModelConfig(48, "none")
    )  # no CV: the tests give the members their out-of-fold probabilities
    with store_at(workdir):
        done = train_folder(smear_dir, base, workdir, (0.5, 0.25, 0.25), "float32")
        info = done["split"]
        multi = replace(base, model=replace(base.model, variant="multiscale"))
        second = train_run(
            multi, info.path, smear_dir, done["features"].cache_dir, dataset_digest=info.digest
        )
    return {
        "workdir": workdir,
        "results": [asdict(done["result"]), asdict(second)],
        "info": info,
        "rows": done["rows"],
        "cache": str(done["features"].cache_dir),
    }


@pytest.fixture()
def two_runs(two_runs_once: dict, mlflow_env: Path) -> dict:
    """The module's two runs in this test's own copy of the store (tests log ensembles there)."""
    from leukemia import tracking

    source = str(two_runs_once["workdir"])
    clone_workdir(two_runs_once["workdir"], mlflow_env)
    tracking.setup()  # MLflow pointed at the copy
    info = two_runs_once["info"]
    return {
        "results": two_runs_once["results"],
        "info": replace(info, path=info.path.replace(source, str(mlflow_env))),
        "rows": two_runs_once["rows"],
        "cache": two_runs_once["cache"].replace(source, str(mlflow_env)),
    }


@pytest.mark.slow
def test_an_ensemble_run_is_registered_like_any_run_and_reproduces_its_metrics(
    two_runs: dict, smear_dir: Path
) -> None:
    """The run names its members; the gate's `log_full_model` builds one model from pixels whose
    test predictions are the mean of the members' full models and match the logged metrics."""
    import mlflow

    from leukemia.ensemble import choose, log_ensemble_run, member_probabilities
    from leukemia.evaluation import evaluate
    from leukemia.features import labels_to_index, load_images
    from leukemia.registry import MODEL_FILE, keras_file
    from leukemia.tracking import log_full_model

    runs, info = two_runs["results"], two_runs["info"]
    labels, probs = member_probabilities(runs, two_runs["rows"], two_runs["cache"])
    choice = {**choose(probs["val"], labels["val"]), "choice": "ensemble"}  # forced: test the log
    tags = {"airflow_run_id": "manual__1", "airflow_task_id": "ensemble"}
    run_id = log_ensemble_run(choice, runs, labels, probs, info.path, info.digest, tags)
    run = mlflow.get_run(run_id)
    members = [r["run_id"] for r in runs]
    assert run.data.tags["kind"] == "ensemble" and run.data.tags["ensemble"] == "true"
    assert json.loads(run.data.tags["ensemble_members"]) == choice["members"] == members
    assert run.data.tags["dataset_digest"] == info.digest and "model_uri" not in run.data.tags
    assert all(mlflow.get_run(m).info.status == "FINISHED" for m in members)  # not failed as stale

    uri = log_full_model(run_id, smear_dir, info.path)
    assert log_full_model(run_id, smear_dir, info.path) == uri
    folder = Path(mlflow.artifacts.download_artifacts(uri))
    assert keras_file(folder, uri) == folder / MODEL_FILE
    import keras

    model = keras.saving.load_model(folder / MODEL_FILE, safe_mode=True)
    test_rows = [r for r in two_runs["rows"] if r["split"] == "test"]
    pixels = load_images([smear_dir / r["path"] for r in test_rows], 48)
    ens_probs = np.asarray(model.predict(pixels, verbose=0))
    singles = [
        np.asarray(mlflow.keras.load_model(log_full_model(m, smear_dir, info.path))(pixels))
        for m in members
    ]
    np.testing.assert_allclose(ens_probs, np.mean(singles, axis=0), atol=1e-5)
    metrics = evaluate(labels_to_index([r["label"] for r in test_rows]), ens_probs)["metrics"]
    assert metrics["accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    assert metrics["f1_macro"] == pytest.approx(run.data.metrics["test_f1_macro"])


@pytest.mark.slow
def test_ensemble_task_returns_the_candidate_unless_the_ensemble_wins(two_runs: dict) -> None:
    import mlflow

    from leukemia.tasks.training_dag import ensemble

    runs, info = two_runs["results"], two_runs["info"]
    split_info = {"path": info.path, "digest": info.digest}
    features = {"cache_dir": two_runs["cache"]}
    candidate = {"run_id": runs[0]["run_id"]}
    assert ensemble(candidate, split_info, features, top_k=0) == candidate  # off
    out = ensemble(candidate, split_info, features, top_k=2)  # the grid is read from MLflow
    choice = out["ensemble"]
    assert set(choice["members"]) == {r["run_id"] for r in runs}
    if choice["ensemble_f1_macro"] > choice["single_f1_macro"]:
        assert choice["choice"] == "ensemble" and out["run_id"] != candidate["run_id"]
        assert mlflow.get_run(out["run_id"]).data.tags["kind"] == "ensemble"
    else:
        assert choice["choice"] == "single" and out["run_id"] == candidate["run_id"]
        assert not mlflow.search_runs(filter_string="tags.kind = 'ensemble'", output_format="list")


def test_run_request_reads_the_ensemble_and_fine_tuning_params() -> None:
    from leukemia.tasks.training_dag import RunRequest

    off = RunRequest.from_params({})
    assert off.ensemble_top_k == 0 and off.fine_tune is False and off.fine_tune_blocks == 1
    run = RunRequest.from_params(
        {"ensemble_top_k": "3", "fine_tune": True, "fine_tune_learning_rate": "2e-5"}
    )
    assert run.ensemble_top_k == 3 and run.fine_tune is True
    assert run.fine_tune_learning_rate == 2e-5 and run.fine_tune_epochs == 10


@pytest.mark.slow
def test_out_of_fold_probabilities_decide_when_every_member_has_them(
    two_runs: dict, tmp_path: Path
) -> None:
    import mlflow

    from leukemia.config import CLASSES
    from leukemia.ensemble import oof_probabilities, select_ensemble
    from leukemia.tracking import OOF_ARTIFACT

    runs, rows = two_runs["results"], two_runs["rows"]
    pool = [r for r in rows if r["split"] in ("train", "val")]
    shas = np.asarray([r["sha256"] for r in pool])
    truth = [CLASSES.index(r["label"]) for r in pool]
    a, b = _onehot(truth), _onehot(truth)
    a[0] = 0.2
    a[0][(truth[0] + 1) % 4] = 0.4  # a unsure and wrong on image 0, b sure and right there
    b[1] = 0.2
    b[1][(truth[1] + 1) % 4] = 0.4  # b unsure and wrong on image 1, a sure and right
    for run, probs in zip(runs, (a, b), strict=True):
        path = tmp_path / run["run_id"] / "oof_probabilities.npz"
        path.parent.mkdir()
        np.savez(path, sha256=shas, probabilities=probs)
        mlflow.MlflowClient().log_artifact(run["run_id"], str(path), Path(OOF_ARTIFACT).parent.name)
        if run is runs[0]:
            assert oof_probabilities(runs, rows) is None  # one member without: validation decides
    y, oof = oof_probabilities(runs, rows)
    assert list(y) == truth and set(oof) == {r["run_id"] for r in runs}
    # each member's out-of-fold probabilities are scaled by its temperature, as its head is
    from leukemia.calibration import Calibration, scale

    for run, probs in zip(runs, (a, b), strict=True):
        t = Calibration.from_tags(mlflow.get_run(run["run_id"]).data.tags).temperature
        np.testing.assert_allclose(oof[run["run_id"]], scale(probs, t), atol=1e-6)
    choice = select_ensemble(runs, two_runs["info"].path, two_runs["cache"], 2)
    assert choice["source"] == "cv" and choice["choice"] == "ensemble"
    assert choice["ensemble_f1_macro"] == 1.0 > choice["single_f1_macro"]
    run = mlflow.get_run(choice["run_id"])
    assert run.data.params["selection_source"] == "cv" and run.data.tags["kind"] == "ensemble"
    # the ensemble's own calibration: T 1.0, its threshold on the same out-of-fold images
    cal = Calibration.from_tags(run.data.tags)
    assert cal.temperature == 1.0 and cal.source == "cv" and cal.images == len(pool)
    assert cal.threshold == 1.0  # 18 images: too few for coverage 0.95
    assert run.data.metrics["test_referral_rate"] == 1.0 and 0 <= run.data.metrics["test_ece"] <= 1
