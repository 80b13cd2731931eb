"""
# Leukaemia classifier: roll the champion back

Moves `leukemia-classifier@champion` back to an earlier version without retraining: the version's
model file must match the sha256 recorded at registration, and a version that failed the promotion
gate or that a reviewer rejected is refused. The move is recorded on the registered model (who
triggered this run, the reason) and emits the `leukemia_champion` asset, so the scoring DAG
re-scores incoming images with the restored champion. `history` prints every move of `@champion`.

The same from a shell: `python -m leukemia champion rollback --to VERSION --reason "..."`. All
logic lives in `include/leukemia` (each task calls `leukemia.tasks.champion_dag`, which calls
`promotion.py` and `registry.py`); this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task

from leukemia.tasks.assets import champion_asset
from leukemia.tasks.params import param


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["leukemia", "registry"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        "to_version": param(
            None,
            type="integer",
            minimum=1,
            title="Roll back to version",
            description="The registered version of leukemia-classifier to make @champion again.",
        ),
        "reason": param(
            "",
            type="string",
            minLength=1,
            title="Reason",
            description="Why the current champion goes: recorded with the move.",
        ),
    },
)
def leukemia_champion() -> None:
    @task(outlets=[champion_asset()])
    def rollback() -> dict[str, Any]:
        from leukemia.tasks import champion_dag as steps

        context = get_current_context()
        params, run = context["params"], context["dag_run"]
        by = getattr(run, "triggering_user_name", None) or "Airflow"
        source = f"{run.dag_id}/{run.run_id}"
        return steps.rollback(params["to_version"], params["reason"], by, source)

    @task
    def history() -> list[str]:
        from leukemia.tasks import champion_dag as steps

        return steps.history()

    rollback() >> history()


leukemia_champion()
