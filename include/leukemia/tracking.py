"""MLflow tracking and the model registry: runs, artifacts, logged models, selection and promotion.

Any tracking server works through `MLFLOW_TRACKING_URI` (default: a SQLite store in the data folder).
Selection uses validation metrics only; the champion alias moves only when the candidate beats the
current champion on the same test split by a margin.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leukemia.config import CLASSES, data_dir, env, mlflow_ui_url, tracking_uri
from leukemia.errors import first_line

if TYPE_CHECKING:
    from leukemia.training import TrainConfig

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SELECTION_METRIC = "val_f1_macro"


def setup(experiment: str | None = None) -> str:
    """Point MLflow at the configured tracking URI and experiment; return the experiment id."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = experiment or env("LEUKEMIA_EXPERIMENT")
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(name) is None:
        # a local store keeps its artifacts in the data folder, not in ./mlruns of whatever cwd
        mlflow.create_experiment(name, artifact_location=(data_dir() / "mlartifacts").as_uri())
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


def log_config(cfg: TrainConfig, dataset_digest: str) -> None:
    """Params of one configuration (everything needed to reproduce it)."""
    import mlflow

    from leukemia.model import feature_width
    from leukemia.weights import weights_identity

    mlflow.log_params(
        {
            **{k: v for k, v in cfg.to_dict().items() if k != "weights"},
            "learning_rate": cfg.lr,
            "head_units": ",".join(str(u) for u in cfg.model.head_units),
            "weights": weights_identity(cfg.model.weights),
            "feature_width": feature_width(cfg.model.variant),
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


def log_outcome(
    cfg: TrainConfig,
    full_model: Any,
    history: dict[str, list[float]],
    results: dict[str, dict[str, Any]],
    test_rows: list[dict[str, str]],
    images_dir: str | Path,
    split_path: str | Path,
    epochs_run: int,
    dataset_digest: str = "",
) -> str:
    """Metrics, figures, report, split, dataset input and the full model of the active run."""
    import mlflow
    import pandas as pd

    from leukemia import plots
    from leukemia.dataset import read_split

    mlflow.log_param("epochs_run", epochs_run)
    for split, res in results.items():
        mlflow.log_metrics({f"{split}_{k}": v for k, v in res["metrics"].items()})
    test = results["test"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plots.confusion_matrix_png(test["confusion_matrix"], out / "confusion_matrix.png")
        plots.training_curves_png(history, out / "training_curves.png", title=cfg.name)
        plots.prediction_grid_png(
            [Path(images_dir) / r["path"] for r in test_rows],
            [CLASSES.index(r["label"]) for r in test_rows],
            test["y_pred"],
            test["confidence"],
            out / "test_predictions.png",
        )
        report = "\n".join(f"== {s} ==\n{r['report']}" for s, r in results.items())
        (out / "classification_report.txt").write_text(report)
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
    mlflow.log_artifact(str(split_path), artifact_path="split")
    frame = pd.DataFrame(read_split(split_path))
    name = f"leukemia-{dataset_digest[:12]}" if dataset_digest else "leukemia"
    dataset = mlflow.data.from_pandas(frame, source=str(images_dir), name=name)
    mlflow.log_input(dataset, context="training")
    info = mlflow.keras.log_model(
        full_model,
        name="model",
        signature=model_signature(cfg.model.input_size),
        pip_requirements=pip_requirements(),
    )
    return info.model_uri


@dataclass
class Promotion:
    """The outcome of select-and-promote (small: fits in XCom)."""

    run_id: str
    version: str
    alias: str
    reason: str
    candidate: dict[str, float]
    champion_before: dict[str, Any] | None


def finished_runs(experiment_id: str, airflow_run_id: str | None = None) -> list[Any]:
    """FINISHED runs of the experiment that hold a model (optionally of one Airflow DAG run)."""
    import mlflow

    query = "attributes.status = 'FINISHED' and tags.kind = 'training'"
    if airflow_run_id:
        query += f" and tags.airflow_run_id = '{airflow_run_id}'"
    return mlflow.search_runs([experiment_id], filter_string=query, output_format="list")


def best_run(runs: list[Any]) -> Any:
    """Highest validation macro-F1; ties go to the lower validation log-loss (of the kept weights)."""
    if not runs:
        raise ValueError("no finished training runs to choose from: did every training task fail?")
    return max(
        runs,
        key=lambda r: (
            r.data.metrics.get(SELECTION_METRIC, -1.0),
            -r.data.metrics.get("val_log_loss", 1e9),
        ),
    )


def current_champion(model_name: str) -> Any | None:
    """The model version the `champion` alias points to, or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def champion_digest(model_name: str) -> str | None:
    """The dataset digest the current champion was trained on (None without a champion)."""
    version = current_champion(model_name)
    return version.tags.get("dataset_digest") if version is not None else None


def evaluate_model_on_split(
    model_uri: str,
    split_path: str | Path,
    images_dir: str | Path,
    split: str = "test",
    batch: int = 32,
) -> dict[str, float]:
    """Metrics of any logged full model on one split's raw images (the champion's re-evaluation)."""
    import mlflow
    import numpy as np

    from leukemia.dataset import read_split
    from leukemia.evaluation import evaluate
    from leukemia.features import labels_to_index, load_images

    model = mlflow.keras.load_model(model_uri)
    size = int(model.input_shape[1])
    rows = [r for r in read_split(split_path) if r["split"] == split]
    probs = [
        model.predict_on_batch(
            load_images([Path(images_dir) / r["path"] for r in rows[i : i + batch]], size)
        )
        for i in range(0, len(rows), batch)
    ]
    return evaluate(labels_to_index([r["label"] for r in rows]), np.concatenate(probs))["metrics"]


def artifacts_missing(exc: BaseException) -> bool:
    """True when loading a model failed because its files are gone (not for a transient error)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, FileNotFoundError):
        return True
    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def compare_with_champion(
    model_name: str,
    candidate: dict[str, float],
    split_path: str | Path,
    images_dir: str | Path,
    margin: float,
    metric: str,
) -> tuple[str, str, dict[str, Any] | None]:
    """The alias a candidate earns, why, and the champion's test metrics re-measured on this split.

    A champion whose model files are gone cannot serve either, so the candidate replaces it (the
    old version stays registered); any other failure to load it is raised, so the task retries.
    """
    champion = current_champion(model_name)
    if champion is None:
        return CHAMPION, "no champion yet", None
    version = str(champion.version)
    try:
        old = evaluate_model_on_split(f"models:/{model_name}/{version}", split_path, images_dir)
    except Exception as exc:
        if not artifacts_missing(exc):
            raise
        error = first_line(exc)
        log.warning(
            "Champion %s v%s cannot be loaded (%s): the new model replaces it; v%s stays registered",
            model_name,
            version,
            error,
            version,
        )
        return (
            CHAMPION,
            f"champion v{version} cannot be loaded ({error}): replaced",
            {
                "version": version,
                "error": error,
            },
        )
    before = {"version": version, **{f"test_{k}": v for k, v in old.items()}}
    new, old_value = candidate[f"test_{metric}"], old[metric]
    if new >= old_value + margin:
        return (
            CHAMPION,
            f"test {metric} {new:.4f} beats champion v{version} {old_value:.4f} + margin {margin}",
            before,
        )
    return (
        CHALLENGER,
        f"test {metric} {new:.4f} does not beat champion v{version} {old_value:.4f} + margin "
        f"{margin}: champion stays",
        before,
    )


def select_and_promote(
    experiment_id: str,
    split_path: str | Path,
    images_dir: str | Path,
    airflow_run_id: str | None = None,
    model_name: str | None = None,
    margin: float = 0.0,
    metric: str = "f1_macro",
) -> Promotion:
    """Register this DAG run's best-by-validation model; make it champion only if it beats the
    current champion on the same test split by `margin`, else give it the challenger alias."""
    import mlflow

    model_name = model_name or env("LEUKEMIA_MODEL_NAME")
    client = mlflow.MlflowClient()
    run = best_run(finished_runs(experiment_id, airflow_run_id))
    metrics = run.data.metrics
    candidate = {k: v for k, v in metrics.items() if k.startswith(("val_", "test_"))}
    alias, reason, before = compare_with_champion(
        model_name, candidate, split_path, images_dir, margin, metric
    )
    model_uri = run.data.tags.get("model_uri") or f"runs:/{run.info.run_id}/model"
    version = mlflow.register_model(model_uri, model_name, await_registration_for=300)
    tags = {
        "dataset_digest": run.data.tags.get("dataset_digest", ""),
        "config": run.data.tags.get("config", ""),
        "airflow_run_id": airflow_run_id or "",
        "run_id": run.info.run_id,
        "selection": reason,
        **{k: f"{v:.4f}" for k, v in candidate.items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    client.set_registered_model_alias(model_name, alias, version.version)
    log.info(
        "Registered %s v%s from run %s as @%s: %s",
        model_name,
        version.version,
        run.info.run_id,
        alias,
        reason,
    )
    return Promotion(run.info.run_id, str(version.version), alias, reason, candidate, before)
