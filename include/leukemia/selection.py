"""Selection of runs: which finished training runs compete, how they rank, and which one won.

Selection uses validation metrics only: the mean k-fold cross-validated macro-F1 over train + val
when every run has it, else the single validation split's; ties go to the lower log-loss of the
same kind. Test metrics never decide. A refit run (`runs.refit_run`) stands for the run it refits
(`selected_run_of`); it never competes, since only runs of kind `training` do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from leukemia.tracking import REFIT_OF_TAG, RunKind

SELECTION_METRIC = "val_f1_macro"


class NoFinishedRuns(ValueError):
    """No configuration finished training: there is nothing to select."""


#: Selection by cross-validation (runs trained with cv_folds > 1), ties by the mean CV log-loss.
CV_SELECTION_METRIC = "cv_f1_macro_mean"


def _training_runs(experiment_id: str, airflow_run_id: str | None = None) -> list[Any]:
    """FINISHED training runs of the experiment (optionally of one Airflow DAG run)."""
    import mlflow

    query = f"attributes.status = 'FINISHED' and tags.kind = '{RunKind.TRAINING.value}'"
    if airflow_run_id:
        query += f" and tags.airflow_run_id = '{airflow_run_id}'"
    return mlflow.search_runs([experiment_id], filter_string=query, output_format="list")


def _finished(run: Any) -> bool:
    """A run that holds a model: not pruned by successive halving, nor between its rounds."""
    from leukemia.halving import PRUNED_TAG, ROUND_TAG

    tags = run.data.tags
    return tags.get(PRUNED_TAG) != "true" and (ROUND_TAG not in tags or "head_uri" in tags)


def _pruned(run: Any) -> bool:
    """A run that successive halving pruned."""
    from leukemia.halving import PRUNED_TAG

    return run.data.tags.get(PRUNED_TAG) == "true"


def finished_runs(experiment_id: str, airflow_run_id: str | None = None) -> list[Any]:
    """FINISHED training runs that hold a model (optionally of one Airflow DAG run): not those
    successive halving pruned, nor one still between its rounds (`halving`)."""
    return [r for r in _training_runs(experiment_id, airflow_run_id) if _finished(r)]


def pruned_runs(experiment_id: str, airflow_run_id: str | None = None) -> list[Any]:
    """FINISHED training runs that successive halving pruned (optionally of one DAG run)."""
    return [r for r in _training_runs(experiment_id, airflow_run_id) if _pruned(r)]


def finished_and_pruned(
    experiment_id: str, airflow_run_id: str | None = None
) -> tuple[list[Any], list[Any]]:
    """`finished_runs` and `pruned_runs` from one search."""
    runs = _training_runs(experiment_id, airflow_run_id)
    return [r for r in runs if _finished(r)], [r for r in runs if _pruned(r)]


def round_runs(experiment_id: str, airflow_run_id: str, number: int) -> list[Any]:
    """The runs of one DAG run that round `number` of successive halving scored and did not prune."""
    from leukemia.halving import PRUNED_TAG, ROUND_TAG

    return [
        r
        for r in _training_runs(experiment_id, airflow_run_id)
        if r.data.tags.get(ROUND_TAG) == str(number) and r.data.tags.get(PRUNED_TAG) != "true"
    ]


def selection_key(run: Any, cross_validated: bool = True) -> tuple[float, float]:
    """(macro-F1, -log-loss) a run is ranked by: the CV means when `cross_validated`, else the
    validation split's."""
    m = run.data.metrics
    if cross_validated:
        return m[CV_SELECTION_METRIC], -m.get("cv_log_loss_mean", 1e9)
    return m.get(SELECTION_METRIC, -1.0), -m.get("val_log_loss", 1e9)


def cross_validated(runs: list[Any]) -> bool:
    """True when every run was cross-validated: selection then ranks by the CV means."""
    return all(CV_SELECTION_METRIC in r.data.metrics for r in runs)


def best_run(runs: list[Any]) -> Any:
    """Highest mean cross-validated macro-F1, ties to the lower mean CV log-loss, when every run was
    cross-validated (cv_folds > 1); else highest validation macro-F1, ties to the lower validation
    log-loss (of the kept weights). Test metrics never decide."""
    if not runs:
        raise NoFinishedRuns(
            "no finished training runs to choose from: did every training task fail?"
        )
    by_cv = cross_validated(runs)
    return max(runs, key=lambda r: selection_key(r, by_cv))


def grid_results(experiment_id: str, airflow_run_id: str | None = None) -> list[dict[str, Any]]:
    """The finished training runs of one DAG run as small dicts (`run_id`, `config`, and `val`:
    the macro-F1 and log-loss selection ranks them by, the CV means when every run has them), so
    later steps read the grid from MLflow rather than from the training tasks' XComs."""
    runs = finished_runs(experiment_id, airflow_run_id)
    by_cv = cross_validated(runs)
    out = []
    for run in runs:
        f1, neg_loss = selection_key(run, by_cv)
        out.append(
            {
                "run_id": run.info.run_id,
                "config": json.loads(run.data.tags["config"]),
                "val": {"f1_macro": f1, "log_loss": -neg_loss},
            }
        )
    return out


def top_runs(results: Sequence[Mapping[str, Any]], k: int) -> list[Mapping[str, Any]]:
    """The k best grid results (`grid_results` or `TrainResult` dicts) by validation macro-F1, then
    lower log-loss: `best_run`'s order on the dicts' `val`."""
    ranked = sorted(
        results, key=lambda r: (-r["val"]["f1_macro"], r["val"].get("log_loss", float("inf")))
    )
    return ranked[: max(k, 0)]


def selected_run_of(run_id: str) -> str:
    """The grid run a registered run stands for: the run it refits (tag `refit_of`), else itself."""
    import mlflow

    try:
        return mlflow.MlflowClient().get_run(run_id).data.tags.get(REFIT_OF_TAG) or run_id
    except Exception:  # the headline must not fail the report
        return run_id


def with_selected_run(promotion: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gate's outcome (`promotion.summary_of`) with `selected_run_id`, the grid run its
    `run_id` stands for, so that the grid summary marks the configuration selection picked."""
    if not promotion or not promotion.get("run_id") or promotion.get("selected_run_id"):
        return promotion
    return {**promotion, "selected_run_id": selected_run_of(promotion["run_id"])}
