"""
# Leukaemia classifier: score incoming images with the champion

Classifies the blood-smear images under `s3://<bucket>/incoming/` with `leukemia-classifier@champion`
and writes `s3://<bucket>/predictions/v<version>/<timestamp>.csv` (key, class, the four class
probabilities, malignant, model version, scored_at). Only images that this model version has not
scored yet are scored: the ledger `predictions/ledger/v<version>.json` records every key and ETag it
scored, so a replaced image is scored again and a new champion re-scores everything.

Runs when a new champion is promoted (`leukemia_champion`) or new images land
(`leukemia_incoming_images`). Without a champion yet, scoring is skipped. Set `explain` for Grad-CAM
overlays beside the CSV. All logic lives in `include/leukemia` (`tasks/scoring_dag.py` → `scoring.py`); this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from leukemia.tasks.assets import champion_asset, incoming_images_asset
from leukemia.tasks.params import s3_params

IO_RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": True}


@dag(
    schedule=(champion_asset() | incoming_images_asset()),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one writer per ledger
    doc_md=__doc__,
    tags=["leukemia", "scoring"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        **s3_params(
            "Bucket holding incoming/ and predictions/.", "incoming/", prefix_key="incoming_prefix"
        ),
        "model_uri": Param(
            "",
            type="string",
            title="Model URI",
            description="Empty: models:/<LEUKEMIA_MODEL_NAME>@champion. Else a registered "
            "version of that model that passed the promotion gate: models:/<name>@challenger or "
            "models:/<name>/<version>. Other URIs are refused (use `leukemia predict`).",
        ),
        "batch_size": Param(
            32,
            type="integer",
            minimum=1,
            maximum=512,
            title="Batch size",
            description="Images scored at once; bounds the task's memory.",
        ),
        "explain": Param(
            False,
            type="boolean",
            title="Grad-CAM",
            description="Also write Grad-CAM overlays and a contact sheet beside the CSV.",
        ),
    },
)
def leukemia_scoring() -> None:
    @task.short_circuit(**IO_RETRIES)
    def resolve_model() -> dict[str, str] | None:
        """Pin the model version for this run (the alias may move while it scores)."""
        from leukemia.tasks import scoring_dag as steps

        return steps.champion_or_none(get_current_context()["params"]["model_uri"] or None)

    @task(**IO_RETRIES)
    def score_new_images(model: dict[str, str]) -> dict[str, Any]:
        from leukemia.tasks import scoring_dag as steps

        params = get_current_context()["params"]
        return steps.score(
            str(params["bucket"]),
            str(params["incoming_prefix"]),
            str(params["conn_id"]),
            model["pinned_uri"],
            int(params["batch_size"]),
            bool(params["explain"]),
        )

    score_new_images(resolve_model())


leukemia_scoring()
