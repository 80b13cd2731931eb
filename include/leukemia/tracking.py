"""MLflow runs: one run per trained configuration (params, curves, metrics, figures, the model), the
grid's summary run, and the search over finished runs that selection starts from.

Any tracking server works through `MLFLOW_TRACKING_URI` (default: a SQLite store in the data folder).
The registered model and its aliases live in `registry`; fitting lives in `training`, which knows
nothing of MLflow. Selection uses validation metrics only.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES, data_dir, env, mlflow_ui_url, tracking_uri
from leukemia.training import TrainConfig

log = logging.getLogger(__name__)

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


@dataclass
class TrainResult:
    """What one configuration produced (small: fits in XCom)."""

    run_id: str
    model_uri: str
    mlflow_url: str
    config: dict[str, Any]
    val: dict[str, float]
    test: dict[str, float]
    epochs_run: int
    seconds: float


def train_run(
    cfg: TrainConfig,
    split_path: str | Path,
    images_dir: str | Path,
    cache_dir: str | Path,
    tags: dict[str, str] | None = None,
    dataset_digest: str = "",
) -> TrainResult:
    """Train, evaluate and log one configuration as one MLflow run; the run ends FAILED on error."""
    import mlflow

    from leukemia.dataset import read_split
    from leukemia.evaluation import evaluate
    from leukemia.model import assemble, build_trunk
    from leukemia.training import fit_head, split_arrays

    started = time.monotonic()
    rows = read_split(split_path)
    data = split_arrays(rows, cache_dir, cfg.model.variant)
    setup()
    run_tags = {"kind": "training", "dataset_digest": dataset_digest, **(tags or {})}
    fail_stale_runs(run_tags)
    with mlflow.start_run(run_name=cfg.name.replace(" · ", "-"), tags=run_tags) as run:
        log_config(cfg, dataset_digest)
        head, history = fit_head(
            cfg,
            *data["train"][:2],
            *data["val"][:2],
            on_epoch=lambda epoch, logs: mlflow.log_metrics(logs, step=epoch),
        )
        results = {
            s: evaluate(data[s][1], head.predict(data[s][0], verbose=0)) for s in ("val", "test")
        }
        epochs_run = len(history.get("loss", []))
        full = assemble(cfg.model, build_trunk(cfg.model), head)
        model_uri = log_outcome(
            cfg,
            full,
            history,
            results,
            data["test"][2],
            images_dir,
            split_path,
            epochs_run,
            dataset_digest,
        )
        mlflow.set_tags(
            {"model_uri": model_uri, "config": json.dumps(cfg.to_dict(), sort_keys=True)}
        )
    result = TrainResult(
        run_id=run.info.run_id,
        model_uri=model_uri,
        mlflow_url=run_url(run.info.experiment_id, run.info.run_id),
        config=cfg.to_dict(),
        val=results["val"]["metrics"],
        test=results["test"]["metrics"],
        epochs_run=epochs_run,
        seconds=round(time.monotonic() - started, 2),
    )
    log.info(
        "%s: val F1 %.3f, test accuracy %.3f (%d epochs, %.0fs), run %s",
        cfg.name,
        result.val["f1_macro"],
        result.test["accuracy"],
        epochs_run,
        result.seconds,
        result.run_id,
    )
    return result


#: Columns of the grid table in the summary run and the task log.
GRID_COLUMNS = (
    "variant",
    "optimizer",
    "batch_size",
    "epochs_run",
    "val_f1_macro",
    "val_log_loss",
    "test_accuracy",
    "test_f1_macro",
    "test_malignant_sensitivity",
    "selected",
)


def grid_rows(results: list[dict[str, Any]], selected_run_id: str | None) -> list[dict[str, Any]]:
    """One row per trained configuration (from `TrainResult` dicts), sorted by variant, optimizer, batch."""
    rows = []
    for r in sorted(
        results,
        key=lambda r: (r["config"]["variant"], r["config"]["optimizer"], r["config"]["batch_size"]),
    ):
        rows.append(
            {
                "variant": r["config"]["variant"],
                "optimizer": r["config"]["optimizer"],
                "batch_size": r["config"]["batch_size"],
                "epochs_run": r["epochs_run"],
                **{f"val_{k}": round(v, 4) for k, v in r["val"].items()},
                **{f"test_{k}": round(v, 4) for k, v in r["test"].items()},
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

    Also made when selection failed (`promotion` None), so the trained grid is never lost from view.
    """
    import mlflow

    from leukemia import plots

    setup()
    promotion = promotion or {}
    rows = grid_rows(results, promotion.get("run_id"))
    table = markdown_table(rows)
    log.info("Grid results:\n%s", table)
    tags = {"kind": "summary", **({"airflow_run_id": airflow_run_id} if airflow_run_id else {})}
    with (
        mlflow.start_run(run_name="grid-summary", tags=tags) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        out = Path(tmp)
        plots.comparison_png(rows, out / "grid_comparison.png")
        headline = (
            f"Selected run {promotion.get('run_id')} → v{promotion.get('version')} "
            f"@{promotion.get('alias')}: {promotion.get('reason')}"
            if promotion
            else "No model was registered: select_and_promote failed (see its task log)."
        )
        (out / "grid_results.md").write_text(f"{headline}\n\n{table}")
        mlflow.log_artifacts(str(out))
        mlflow.log_dict({"rows": rows, "promotion": promotion}, "grid_results.json")
        best = next((r for r in rows if r["selected"]), None)
        if best:
            mlflow.log_metrics({k: v for k, v in best.items() if k.startswith(("val_", "test_"))})
    return {"summary_run_id": run.info.run_id, "configurations": len(rows), **promotion}


def train_folder(
    images_dir: str | Path,
    cfg: TrainConfig,
    workdir: str | Path,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    precision: str = "auto",
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Split → extract → train one configuration on a local `<Class>/<name>` folder (no Airflow).

    For the CLI, benchmarks and tests; returns the split info, extraction and training results.
    """
    from leukemia.dataset import make_split, read_split
    from leukemia.features import extract_features

    images_dir, workdir = Path(images_dir), Path(workdir)
    info = make_split(images_dir, workdir / "splits", fractions=fractions)
    rows = read_split(info.path)
    extracted = extract_features(
        [images_dir / r["path"] for r in rows],
        [r["sha256"] for r in rows],
        cfg.model,
        workdir / "features",
        precision=precision,
    )
    result = train_run(
        cfg, info.path, images_dir, extracted.cache_dir, tags=tags, dataset_digest=info.digest
    )
    return {"split": info, "features": extracted, "result": result, "rows": rows}
