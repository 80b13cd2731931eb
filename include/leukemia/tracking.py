"""Talking to MLflow: where runs go, what a run of each kind (`RunKind`) logs, and reading it back.

One context manager, `training_run`, starts every run that trains or scores a model (a grid
configuration, its refit, an ensemble, a fine-tuning): its `kind` tag, the runs an earlier attempt
of the same Airflow task left ended FAILED, and MLflow's own status handling. A configuration's run
logs only what is its own: the head (Normalization and Dense layers, a `.keras` file of a few MB),
not the frozen VGG16 trunk that every configuration shares (58 MB). `log_full_model` assembles and
logs the pixels-to-softmax model for the one run that is registered. A run's calibration (tags,
metrics, reliability diagram) is `log_calibration`; the grid's summary run is `log_grid_summary`.

Any tracking server works through `MLFLOW_TRACKING_URI` (default: a SQLite store in the data folder).
What drives a configuration's training is `runs`; which run wins is `selection`; the registered
model and its aliases live in `registry`. Nothing here trains.
"""

from __future__ import annotations

import enum
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from leukemia.config import CLASSES, env, mlflow_ui_url, tracking_uri
from leukemia.training import TrainConfig

if TYPE_CHECKING:
    from leukemia.calibration import Calibration

log = logging.getLogger(__name__)


class RunKind(enum.StrEnum):
    """The `kind` tag of each MLflow run the pipeline starts (the values are stored: never rename)."""

    TRAINING = "training"  # one grid configuration: the only kind selection compares
    REFIT = "refit"  # the selected configuration trained again on train + val
    ENSEMBLE = "ensemble"  # the mean of the top-k heads
    FINE_TUNE = "fine_tune"  # the selected model fine-tuned from pixels
    EVALUATION = "evaluation"  # the gate's measurement of one registered version
    SUMMARY = "summary"  # the grid's table and comparison figure


#: The tag of a refit run that names the run selection picked (and it trained again).
REFIT_OF_TAG = "refit_of"
#: Where a training run keeps its head, and the tag that holds the file's sha256.
HEAD_ARTIFACT = "head/head.keras"
HEAD_SHA256_TAG = "head_sha256"
#: The out-of-fold probabilities of a cross-validated run: arrays `sha256` (n,) and
#: `probabilities` (n, 4), what an ensemble of runs can be judged on.
OOF_ARTIFACT = "cv/oof_probabilities.npz"
#: Images in the prediction grid logged with the registered model.
GRID_IMAGES = 20


def setup(experiment: str | None = None) -> str:
    """Point MLflow at the configured tracking URI and experiment; return the experiment id."""
    import mlflow

    uri = tracking_uri()
    store = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = experiment or env("LEUKEMIA_EXPERIMENT")
    if store is not None and mlflow.get_experiment_by_name(name) is None:
        # a local store keeps its artifacts beside its database (never in a task's local folder,
        # never in ./mlruns of whatever cwd)
        mlflow.create_experiment(name, artifact_location=(store / "mlartifacts").as_uri())
    return mlflow.set_experiment(name).experiment_id


def run_url(experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run."""
    return f"{mlflow_ui_url()}/#/experiments/{experiment_id}/runs/{run_id}"


def fail_stale_runs(tags: dict[str, str]) -> int:
    """End as FAILED the runs an earlier attempt of the same Airflow task left (same run id and map
    index), whether killed while RUNNING or FINISHED before the task itself failed: a retry must not
    leave two finished runs competing for one map index."""
    import mlflow

    if "airflow_run_id" not in tags:
        return 0
    query = " and ".join(
        f"tags.{k} = '{v}'" for k, v in sorted(tags.items()) if k.startswith("airflow_")
    )
    earlier = [
        r
        for r in mlflow.search_runs(filter_string=query, output_format="list")
        if r.info.status in ("RUNNING", "FINISHED", "SCHEDULED")
    ]
    client = mlflow.MlflowClient()
    for run in earlier:
        client.set_tag(run.info.run_id, "superseded_by_retry", "true")
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("Run %s of an earlier attempt of this task now ends FAILED", run.info.run_id)
    return len(earlier)


@contextmanager
def training_run(kind: RunKind, name: str, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start an MLflow run of kind `kind` named `name` with `tags`, after ending FAILED the runs an
    earlier attempt of the same Airflow task left (`fail_stale_runs`); yield the active run.

    As `mlflow.start_run`, the run ends FINISHED, or FAILED when the block raises.
    """
    import mlflow

    setup()
    run_tags = {**(tags or {}), "kind": RunKind(kind).value}
    fail_stale_runs(run_tags)
    with mlflow.start_run(run_name=name, tags=run_tags) as run:
        yield run


@contextmanager
def resumed_run(run_id: str) -> Iterator[Any]:
    """The run `run_id` active again for the block (a later round of successive halving); it ends
    FINISHED, or FAILED when the block raises."""
    import mlflow

    setup()
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def tag_run(
    run_id: str, tags: Mapping[str, str], metrics: Mapping[str, float] | None = None
) -> None:
    """Tags (and metrics) on a run that is not active."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)


def log_epoch(epoch: int, logs: Mapping[str, float]) -> None:
    """One epoch's curves on the active run (the `on_epoch` callback of the fitting loops)."""
    import mlflow

    mlflow.log_metrics(dict(logs), step=epoch)


def log_values(
    params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None
) -> None:
    """Params and metrics of the active run."""
    import mlflow

    if params:
        mlflow.log_params(dict(params))
    if metrics:
        mlflow.log_metrics(dict(metrics))


def log_folder(folder: str | Path) -> None:
    """Every file of a local folder as artifacts of the active run."""
    import mlflow

    mlflow.log_artifacts(str(folder))


def get_run(run_id: str) -> Any:
    """One MLflow run (info, params, metrics, tags)."""
    import mlflow

    return mlflow.MlflowClient().get_run(run_id)


def artifact_names(run_id: str, folder: str) -> set[str]:
    """The file names of a run's artifact folder."""
    import mlflow

    return {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, folder)}


def download(run_id: str, artifact_path: str) -> str:
    """A run's artifact, downloaded; its local path."""
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path)


def log_config(cfg: TrainConfig, dataset_digest: str) -> None:
    """Params of one configuration (everything needed to reproduce it)."""
    import mlflow

    from leukemia.augment import AUGMENT_VERSION
    from leukemia.model import feature_width
    from leukemia.weights import weights_identity

    mlflow.log_params(
        {
            **{k: v for k, v in cfg.to_dict().items() if k != "weights"},
            "learning_rate": cfg.lr,
            "head_units": ",".join(str(u) for u in cfg.model.head_units),
            "weights": weights_identity(cfg.model.weights),
            "feature_width": feature_width(cfg.model.variant),
            "augment_version": AUGMENT_VERSION if cfg.augment_copies else "none",
            "dataset_digest": dataset_digest,
        }
    )


def model_signature(input_size: int) -> Any:
    """Raw pixels (n, size, size, 3) float32 0-255 in, four class probabilities out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, input_size, input_size, 3), "pixels")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(CLASSES)), "probabilities")]),
    )


def pip_requirements() -> list[str]:
    """The logged model's runtime requirements, pinned to what trained it (no slow inference)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("tensorflow-cpu", "keras", "numpy", "mlflow")]


def save_head(head: Any, path: str | Path) -> Path:
    """The head as a `.keras` file: its layers and weights (the adapted Normalization included), without
    the optimizer's state, which nothing reads again."""
    import keras

    bare = keras.Model(head.inputs, head.outputs, name=head.name)  # the same layers, not compiled
    bare.save(path)
    return Path(path)


def log_results(
    results: Mapping[str, Mapping[str, Any]],
    out: Path,
    history: Mapping[str, list[float]] | None = None,
    title: str = "",
) -> None:
    """Log `<split>_<metric>` of each split's `evaluation.evaluate` result to the active run and write
    the report files every trained run has into `out`: the test split's `confusion_matrix.png`,
    `classification_report.txt` of every split and, given a `history`, `training_curves.png`."""
    import mlflow

    from leukemia import plots

    for split, res in results.items():
        mlflow.log_metrics({f"{split}_{k}": v for k, v in res["metrics"].items()})
    plots.confusion_matrix_png(results["test"]["confusion_matrix"], out / "confusion_matrix.png")
    if history is not None:
        plots.training_curves_png(history, out / "training_curves.png", title=title)
    report = "\n".join(f"== {s} ==\n{r['report']}" for s, r in results.items())
    (out / "classification_report.txt").write_text(report)


def log_outcome(
    cfg: TrainConfig,
    head: Any,
    history: dict[str, list[float]],
    results: dict[str, dict[str, Any]],
    rows: list[dict[str, str]],
    images_dir: str | Path,
    split_path: str | Path,
    epochs_run: int,
    dataset_digest: str = "",
) -> str:
    """Metrics, figures, report, dataset input, the head and the `head_uri` / `config` tags of the
    active run; returns the head's URI.

    The split itself is named (tag `split_uri`), not copied: the registered run gets a copy.
    """
    import mlflow
    import pandas as pd

    from leukemia.dataset import file_sha256

    mlflow.log_param("epochs_run", epochs_run)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        log_results(results, out, history, title=cfg.name)
        (out / "metrics.json").write_text(
            json.dumps(
                {
                    s: {**r["metrics"], "confusion_matrix": r["confusion_matrix"]}
                    for s, r in results.items()
                },
                indent=1,
            )
        )
        mlflow.log_artifacts(str(out))
        head_dir = out / "head"
        head_dir.mkdir()
        head_file = save_head(head, head_dir / Path(HEAD_ARTIFACT).name)
        mlflow.log_artifact(str(head_file), artifact_path=str(Path(HEAD_ARTIFACT).parent))
        mlflow.set_tag(HEAD_SHA256_TAG, file_sha256(head_file))
    name = f"leukemia-{dataset_digest[:12]}" if dataset_digest else "leukemia"
    dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=str(images_dir), name=name)
    mlflow.log_input(dataset, context="training")
    head_uri = f"runs:/{mlflow.active_run().info.run_id}/{HEAD_ARTIFACT}"
    mlflow.set_tags(
        {
            "split_uri": str(split_path),
            "head_uri": head_uri,
            "config": json.dumps(cfg.to_dict(), sort_keys=True),
        }
    )
    return head_uri


def log_cross_validation(cv: Mapping[str, Any], shas: list[str]) -> dict[str, float]:
    """Log a `training.cross_validate` result to the active run: per fold `cv_fold<i>_val_<metric>`
    (and the epoch kept, the images held out), `cv_<metric>_mean` / `_std`, and every image's
    out-of-fold probabilities (rows in the order of `shas`) as `OOF_ARTIFACT`; returns the means and
    standard deviations it logged."""
    import mlflow
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(OOF_ARTIFACT).name
        np.savez(path, sha256=np.asarray(shas), probabilities=cv["oof"])
        mlflow.log_artifact(str(path), artifact_path=str(Path(OOF_ARTIFACT).parent))
    log_folds(cv["folds"])
    summary = {f"cv_{k}": v for k, v in cv.items() if k.endswith(("_mean", "_std"))}
    mlflow.log_metrics(summary)
    return summary


def log_fold_probabilities(rows: Any, probabilities: Any, first: int, stop: int) -> None:
    """The out-of-fold probabilities of folds `first`..`stop` (0-based) on the active run: `rows`
    (their positions in train + val) and `probabilities`, as `cv/oof_folds_<first>-<stop>.npz`
    (`merged_fold_probabilities` joins a run's parts)."""
    import mlflow
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"oof_folds_{first}-{stop}.npz"
        np.savez(path, rows=np.asarray(rows), probabilities=np.asarray(probabilities))
        mlflow.log_artifact(str(path), artifact_path=str(Path(OOF_ARTIFACT).parent))


def merged_fold_probabilities(run_id: str, n: int, classes: int) -> Any:
    """The (n, classes) out-of-fold probabilities of a run from its `log_fold_probabilities`
    parts; a row no part holds is an error (a fold was never fitted)."""
    import numpy as np

    out = np.full((n, classes), np.nan, dtype="float32")
    folder = str(Path(OOF_ARTIFACT).parent)
    for name in sorted(artifact_names(run_id, folder)):
        if Path(name).name.startswith("oof_folds_"):
            with np.load(download(run_id, f"{folder}/{Path(name).name}")) as part:
                out[part["rows"]] = part["probabilities"]
    missing = int(np.isnan(out).any(axis=1).sum())
    if missing:
        raise ValueError(f"run {run_id}: {missing} of {n} images have no out-of-fold probabilities")
    return out


def log_folds(folds: Sequence[Mapping[str, Any]]) -> None:
    """Each fold's metrics (`training.cross_validate`'s `folds`) on the active run, named by the
    fold's `number`: `cv_fold<i>_val_<metric>`, `cv_fold<i>_best_epoch`, `cv_fold<i>_images`."""
    import mlflow

    for i, fold in enumerate(folds, 1):
        n = fold.get("number", i)
        mlflow.log_metrics(
            {
                (f"cv_fold{n}_{k}" if k in ("best_epoch", "images") else f"cv_fold{n}_val_{k}"): v
                for k, v in fold.items()
                if k != "number"
            }
        )


def logged_folds(metrics: Mapping[str, float], folds: int) -> list[dict[str, float]]:
    """The first `folds` folds a run logged (`log_folds`), read back from its metrics as
    `training.cross_validate`'s `folds` entries (`number`, the CV metrics, `images`)."""
    from leukemia.training import CV_METRICS

    return [
        {
            "number": i,
            **{
                m: metrics[f"cv_fold{i}_{m}" if m == "best_epoch" else f"cv_fold{i}_val_{m}"]
                for m in CV_METRICS
            },
            "images": metrics[f"cv_fold{i}_images"],
        }
        for i in range(1, folds + 1)
    ]


#: Where a run keeps its calibration's reliability diagram and numbers (`log_calibration`).
CALIBRATION_ARTIFACTS = "calibration"


def log_calibration(
    cal: Calibration, test: tuple[Any, Any], held_out: tuple[Any, Any] | None = None
) -> dict[str, float]:
    """Log a run's calibration (`calibration.Calibration`) to the active run; returns its test
    metrics.

    Tags `calibration_*` (`Calibration.as_tags`); metrics `temperature`, `conformal_threshold`,
    `calibration_ece_before/_after`, `calibration_brier_before/_after`; on the test split's
    calibrated probabilities `test` (probabilities, labels): `test_ece`, `test_brier` and
    `test_<k>` of `calibration.set_metrics` (coverage, referral_rate, mean_set_size, …); and
    `calibration/reliability.png` and `calibration/calibration.json`. `held_out` (the uncalibrated
    probabilities the temperature was fitted on, with labels) is drawn before and after scaling;
    a refit, which inherits its calibration, has none.
    """
    from dataclasses import asdict

    import mlflow

    from leukemia import calibration, plots

    test_metrics = {
        "test_ece": calibration.expected_calibration_error(*test),
        "test_brier": calibration.brier_score(*test),
        **{f"test_{k}": v for k, v in calibration.set_metrics(*test, cal.threshold).items()},
    }
    mlflow.set_tags(cal.as_tags())
    mlflow.log_metrics(
        {
            "temperature": cal.temperature,
            "conformal_threshold": cal.threshold,
            **{
                f"calibration_{k}": getattr(cal, k)
                for k in ("ece_before", "ece_after", "brier_before", "brier_after")
            },
            **test_metrics,
        }
    )
    curves: dict[str, tuple[Any, Any]] = {}
    if held_out is not None:
        where = "out-of-fold" if cal.source == "cv" else "validation"
        if cal.temperature != 1.0:
            curves[f"{where}, before"] = held_out
        scaled = calibration.scale(held_out[0], cal.temperature)
        curves[f"{where}, T = {cal.temperature:.2f}"] = (scaled, held_out[1])
    curves["test, calibrated"] = test
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plots.reliability_diagram_png(curves, out / "reliability.png")
        (out / "calibration.json").write_text(
            json.dumps(
                {
                    "calibration": asdict(cal),
                    "test": test_metrics,
                    "reliability": {k: calibration.reliability(*v) for k, v in curves.items()},
                },
                indent=1,
            )
        )
        mlflow.log_artifacts(str(out), artifact_path=CALIBRATION_ARTIFACTS)
    return test_metrics


def load_head(run_id: str) -> Any:
    """The head a training run logged, loaded with safe_mode after its sha256 matched the run's tag."""
    import keras
    import mlflow

    from leukemia.dataset import file_sha256

    expected = mlflow.MlflowClient().get_run(run_id).data.tags.get(HEAD_SHA256_TAG)
    path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=HEAD_ARTIFACT))
    actual = file_sha256(path)
    if expected != actual:
        raise ValueError(
            f"the head of run {run_id} has sha256 {actual[:12]}…, not the {str(expected)[:12]}… "
            "recorded when it was trained: the artifact changed; train the configuration again"
        )
    return keras.saving.load_model(path, safe_mode=True)


#: The tag of an ensemble run that lists its members' run ids (JSON), best first.
ENSEMBLE_MEMBERS_TAG = "ensemble_members"


def run_config(run: Any) -> TrainConfig:
    """The configuration a training run was trained with, checked against this worker's weights."""
    from leukemia.weights import weights_identity

    cfg = TrainConfig.from_dict(json.loads(run.data.tags["config"]))
    trained_on, here = run.data.params.get("weights"), weights_identity(cfg.model.weights)
    if trained_on and trained_on != here:
        raise ValueError(
            f"run {run.info.run_id} was trained on features of weights {trained_on}, but "
            f"{cfg.model.weights} is {here} on this worker: give every worker the same weights file"
        )
    return cfg


def full_model_of(run: Any) -> Any:
    """The pixels-to-softmax model of a run: its head on the trunk, or, for an ensemble run, its
    members' heads on one shared trunk (`model.build_ensemble`)."""
    import mlflow

    from leukemia.model import assemble, build_ensemble, build_trunk, shared_trunk

    members = json.loads(run.data.tags.get(ENSEMBLE_MEMBERS_TAG) or "[]")
    if not members:
        cfg = run_config(run)
        return assemble(cfg.model, build_trunk(cfg.model), load_head(run.info.run_id))
    client = mlflow.MlflowClient()
    configs = [run_config(client.get_run(m)) for m in members]
    heads = [(c.model.variant, load_head(m)) for c, m in zip(configs, members, strict=True)]
    return build_ensemble(shared_trunk([c.model for c in configs]), heads)


def log_model(run_id: str, full: Any, images_dir: str | Path, split_path: str | Path) -> str:
    """Log a pixels-to-softmax Keras model with run `run_id` the way the registry expects; its URI.

    The model goes in `model/` (MLflow's Keras flavour, signature, pinned requirements), with a
    prediction grid of test images (read from `images_dir`, a folder or an `s3://` prefix) and a
    copy of the split; the run's `model_uri` tag names it.
    """
    import mlflow
    import numpy as np
    from mlflow.models import Model

    from leukemia import plots
    from leukemia.dataset import read_split
    from leukemia.features import load_images
    from leukemia.objectstore import join, read_location, split_location

    client = mlflow.MlflowClient()
    size = int(full.input_shape[1])
    info = Model.log(
        artifact_path=None,
        name="model",
        flavor=mlflow.keras,
        model=full,
        signature=model_signature(size),
        pip_requirements=pip_requirements(),
        run_id=run_id,
    )
    rows = read_split(split_path)
    test = [r for r in rows if r["split"] == "test"]
    step = max(1, len(test) // GRID_IMAGES)
    sample = test[::step][:GRID_IMAGES]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if sample:
            pixels = load_images([join(images_dir, r["path"]) for r in sample], size)
            probs = np.asarray(full.predict_on_batch(pixels))
            plots.prediction_grid_png(
                list(pixels),
                [CLASSES.index(r["label"]) for r in sample],
                probs.argmax(axis=1).tolist(),
                probs.max(axis=1).tolist(),
                out / "test_predictions.png",
                title=f"Test images ({len(sample)} of {len(test)})",
            )
            client.log_artifact(run_id, str(out / "test_predictions.png"))
        split_copy = out / split_location(split_path)[1]
        split_copy.write_bytes(read_location(split_path))
        client.log_artifact(run_id, str(split_copy), artifact_path="split")
        log_int8_calibration(client, run_id, rows, images_dir, size)
    client.set_tag(run_id, "model_uri", info.model_uri)
    log.info("Logged the full model of run %s: %s", run_id, info.model_uri)
    return info.model_uri


def log_int8_calibration(
    client: Any, run_id: str, rows: list[dict[str, str]], images_dir: str | Path, size: int
) -> None:
    """For a run whose configuration says int8 features: the images its int8 network was
    calibrated on (`backends.training_calibration` of its split, as extraction chose them), as
    `backends.CALIBRATION_ARTIFACT`, so that scoring derives the same int8 network."""
    from leukemia import backends
    from leukemia.dataset import training_shas
    from leukemia.objectstore import join

    config = json.loads(client.get_run(run_id).data.tags.get("config") or "{}")
    if config.get("backend") != backends.INT8:
        return
    paths: dict[str, str | Path] = {}
    for row in rows:
        paths.setdefault(row["sha256"], join(images_dir, row["path"]))
    calibration = backends.training_calibration(paths, training_shas(rows), size)
    if calibration is None:
        log.warning("Run %s has no training images to log as its int8 calibration", run_id)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(backends.CALIBRATION_ARTIFACT).name
        path.write_text(calibration.to_json())
        client.log_artifact(
            run_id, str(path), artifact_path=str(Path(backends.CALIBRATION_ARTIFACT).parent)
        )


def log_full_model(run_id: str, images_dir: str | Path, split_path: str | Path) -> str:
    """Assemble the pixels-to-softmax model of a run and log it with the run; its model URI.

    Done only for the model that is registered: the trunk is built from the run's configuration (the
    weights must be those whose features trained the head: same identity), the head is the run's own
    (an ensemble run: its members' heads). Idempotent: a run that has its model (a fine-tuned run
    logs its own) returns it.
    """
    import mlflow

    setup()
    run = mlflow.MlflowClient().get_run(run_id)
    if run.data.tags.get("model_uri"):
        return run.data.tags["model_uri"]
    return log_model(run_id, full_model_of(run), images_dir, split_path)


#: The tag that holds a run's shortcut warnings, one a line ("" when no check exceeded its limit).
SHORTCUT_TAG = "shortcut_warnings"
#: Where the audit's report, numbers and picture go in the run's artifacts.
AUDIT_ARTIFACTS = "audit"


class AuditReport(Protocol):
    """What `log_audit` logs: an `audit.AuditResult` (named here without importing the audit)."""

    metrics: dict[str, float]
    warnings: list[str]
    overlays: list[Any]
    captions: list[str]

    def to_markdown(self) -> str: ...

    def to_json(self) -> str: ...


def log_audit(run_id: str, result: AuditReport) -> None:
    """Log a shortcut audit to a (finished) run: `audit_*` metrics, `audit/shortcut_audit.md` and
    `.json`, a contact sheet of Grad-CAM overlays, and the `shortcut_warnings` tag."""
    import mlflow
    from mlflow.entities import Metric

    from leukemia.plots import contact_sheet_png

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    metrics = [Metric(f"audit_{k}", float(v), now, 0) for k, v in result.metrics.items()]
    client.log_batch(run_id, metrics=metrics)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "shortcut_audit.md").write_text(result.to_markdown())
        (out / "shortcut_audit.json").write_text(result.to_json())
        if result.overlays:
            contact_sheet_png(
                result.overlays,
                result.captions,
                out / "gradcam.png",
                title="Grad-CAM of test images (label · prediction)",
            )
        client.log_artifacts(run_id, str(out), artifact_path=AUDIT_ARTIFACTS)
    client.set_tag(run_id, SHORTCUT_TAG, "\n".join(result.warnings))


#: Columns of the grid table in the summary run and the task log.
GRID_COLUMNS = (
    "variant",
    "head",
    "optimizer",
    "batch_size",
    "epochs_run",
    "cv_f1_macro_mean",
    "cv_log_loss_mean",
    "val_f1_macro",
    "val_log_loss",
    "test_accuracy",
    "test_f1_macro",
    "test_malignant_sensitivity",
    "selected",
    "pruned_after_round",
)


def grid_rows(results: list[dict[str, Any]], selected_run_id: str | None) -> list[dict[str, Any]]:
    """One row per trained configuration (from `TrainResult` dicts), sorted by variant, head,
    optimizer, batch."""
    rows = []
    for r in sorted(
        results,
        key=lambda r: (
            r["config"]["variant"],
            r["config"].get("head", "mlp"),
            r["config"]["optimizer"],
            r["config"]["batch_size"],
        ),
    ):
        rows.append(
            {
                "variant": r["config"]["variant"],
                "head": r["config"].get("head", "mlp"),
                "optimizer": r["config"]["optimizer"],
                "batch_size": r["config"]["batch_size"],
                "epochs_run": r.get("epochs_run", ""),
                **{k: round(v, 4) for k, v in r.get("cv", {}).items()},
                **{f"val_{k}": round(v, 4) for k, v in r.get("val", {}).items()},
                **{f"test_{k}": round(v, 4) for k, v in r.get("test", {}).items()},
                **(
                    {"pruned_after_round": r["pruned_after_round"]}
                    if "pruned_after_round" in r
                    else {}
                ),
                "run_id": r["run_id"],
                "selected": r["run_id"] == selected_run_id,
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = GRID_COLUMNS) -> str:
    """A Markdown table of `rows` with `columns`."""
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return table + "".join(
        "| " + " | ".join(str(row.get(c, "")) for c in columns) + " |\n" for row in rows
    )


def log_grid_summary(
    results: list[dict[str, Any]],
    promotion: dict[str, Any] | None,
    airflow_run_id: str | None = None,
) -> dict[str, Any]:
    """A summary MLflow run: the grid's comparison figure and a table of every configuration.

    `promotion` is the gate's outcome with the run selection picked (`selection.with_selected_run`);
    the summary is also made when selection failed (`promotion` None), so the trained grid is never
    lost from view.
    """
    import mlflow

    from leukemia import plots

    setup()
    promotion = promotion or {}
    rows = grid_rows(results, promotion.get("selected_run_id") or promotion.get("run_id"))
    table = markdown_table(rows)
    log.info("Grid results:\n%s", table)
    tags = {
        "kind": RunKind.SUMMARY.value,
        **({"airflow_run_id": airflow_run_id} if airflow_run_id else {}),
    }
    with (
        mlflow.start_run(run_name="grid-summary", tags=tags) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        out = Path(tmp)
        # one row of panels per variant and head; the CV score beside the validation split's
        panels = [
            {**r, "variant": r["variant"] + ("" if r["head"] == "mlp" else f" · {r['head']}")}
            for r in rows
            if "pruned_after_round" not in r  # halving stopped it: no val or test metrics
        ]
        metrics = ("val_f1_macro", "val_accuracy", "test_accuracy")
        if any("cv_f1_macro_mean" in r for r in rows):
            metrics = ("cv_f1_macro_mean", *metrics)
        plots.comparison_png(panels, out / "grid_comparison.png", metrics=metrics)
        headline = (
            f"Selected run {promotion.get('selected_run_id') or promotion.get('run_id')}"
            + (
                f" (registered: its refit on train + val, run {promotion.get('run_id')})"
                if promotion.get("selected_run_id") not in (None, promotion.get("run_id"))
                else ""
            )
            + f" → v{promotion.get('version')} "
            f"@{promotion.get('alias')}: {promotion.get('reason')}"
            if promotion
            else "No model was registered or gated: select_candidate or register_and_gate failed "
            "(see their task logs)."
        )
        (out / "grid_results.md").write_text(f"{headline}\n\n{table}")
        mlflow.log_artifacts(str(out))
        mlflow.log_dict({"rows": rows, "promotion": promotion}, "grid_results.json")
        best = next((r for r in rows if r["selected"]), None)
        if best:
            mlflow.log_metrics(
                {k: v for k, v in best.items() if k.startswith(("cv_", "val_", "test_"))}
            )
    return {"summary_run_id": run.info.run_id, "configurations": len(rows), **promotion}
