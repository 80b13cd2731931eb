"""Airflow UI addition: an "MLflow run" button on each training task, linking to the run it logged.

The training task returns `mlflow_url` in its XCom; the link reads it back for the task instance
(mapped tasks included, one run per map index).
"""

from __future__ import annotations

import json
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk import BaseOperatorLink


class MLflowRunLink(BaseOperatorLink):
    """Link from a task instance to the MLflow run whose URL it returned."""

    name = "MLflow run"
    operators = [_PythonDecoratedOperator]

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:
            row = session.execute(
                XComModel.get_many(
                    key="return_value",
                    run_id=ti_key.run_id,
                    dag_ids=ti_key.dag_id,
                    task_ids=ti_key.task_id,
                    map_indexes=ti_key.map_index,
                ).with_only_columns(XComModel.value)
            ).first()
        return mlflow_url_from_xcom(row.value if row else None)


def mlflow_url_from_xcom(value: Any) -> str:
    """The `mlflow_url` of a task's return value (JSON text or dict), or "" when it has none."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError:
            return ""
    return str(value.get("mlflow_url", "")) if isinstance(value, dict) else ""


class LeukemiaPlugin(AirflowPlugin):
    """Registers the MLflow link for Python-decorated tasks (the training DAG's tasks)."""

    name = "leukemia"
    operator_extra_links = [MLflowRunLink()]
