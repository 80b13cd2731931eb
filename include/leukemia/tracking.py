"""MLflow runs: one run per trained configuration (params, curves, metrics, figures, its head), the
full model of the run that gets registered, the grid's summary run, and the search over finished
runs that selection starts from.

A configuration's run logs only what is its own: the head (Normalization and Dense layers, a
`.keras` file of a few MB), not the frozen VGG16 trunk that every configuration shares (58 MB).
`log_full_model` assembles and logs the pixels-to-softmax model for the one run that is registered.

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

from leukemia.config import CLASSES, env, mlflow_ui_url, tracking_uri
from leukemia.training import TrainConfig

log = logging.getLogger(__name__)

SELECTION_METRIC = "val_f1_macro"
#: Where a training run keeps its head, and the tag that holds the file's sha256.
HEAD_ARTIFACT = "head/head.keras"
HEAD_SHA256_TAG = "head_sha256"
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


def save_head(head: Any, path: str | Path) -> Path:
    """The head as a `.keras` file: its layers and weights (the adapted Normalization included), without
    the optimizer's state, which nothing reads again."""
    import keras

    bare = keras.Model(head.inputs, head.outputs, name=head.name)  # the same layers, not compiled
    bare.save(path)
    return Path(path)


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
    """Metrics, figures, report, dataset input and the head of the active run; returns the head's URI.

    The split itself is named (tag `split_uri`), not copied: the registered run gets a copy.
    """
    import mlflow
    import pandas as pd

    from leukemia import plots
    from leukemia.dataset import file_sha256

    mlflow.log_param("epochs_run", epochs_run)
    for split, res in results.items():
        mlflow.log_metrics({f"{split}_{k}": v for k, v in res["metrics"].items()})
    test = results["test"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plots.confusion_matrix_png(test["confusion_matrix"], out / "confusion_matrix.png")
        plots.training_curves_png(history, out / "training_curves.png", title=cfg.name)
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
        head_dir = out / "head"
        head_dir.mkdir()
        head_file = save_head(head, head_dir / Path(HEAD_ARTIFACT).name)
        mlflow.log_artifact(str(head_file), artifact_path=str(Path(HEAD_ARTIFACT).parent))
        mlflow.set_tag(HEAD_SHA256_TAG, file_sha256(head_file))
    name = f"leukemia-{dataset_digest[:12]}" if dataset_digest else "leukemia"
    dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=str(images_dir), name=name)
    mlflow.log_input(dataset, context="training")
    mlflow.set_tag("split_uri", str(split_path))
    return f"runs:/{mlflow.active_run().info.run_id}/{HEAD_ARTIFACT}"


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
    client.set_tag(run_id, "model_uri", info.model_uri)
    log.info("Logged the full model of run %s: %s", run_id, info.model_uri)
    return info.model_uri


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
    head_uri: str
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
        head_uri = log_outcome(
            cfg, head, history, results, rows, images_dir, split_path, epochs_run, dataset_digest
        )
        mlflow.set_tags({"head_uri": head_uri, "config": json.dumps(cfg.to_dict(), sort_keys=True)})
    result = TrainResult(
        run_id=run.info.run_id,
        head_uri=head_uri,
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
            else "No model was registered or gated: select_candidate or register_and_gate failed "
            "(see their task logs)."
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
