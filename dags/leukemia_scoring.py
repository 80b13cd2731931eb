"""
# Leukaemia classifier: score incoming images with the champion

Classifies the blood-smear images under `s3://<bucket>/incoming/` with `leukemia-classifier@champion`
and writes `s3://<bucket>/predictions/v<version>/<timestamp>.csv` (key, class, the four class
probabilities, malignant, model version, scored_at, calibrated confidence, prediction set, refer and
its reason, Grad-CAM overlay key). Only images that this model version has not scored yet are
scored: the ledger `predictions/ledger/v<version>.json` records every key and ETag it scored, so a
replaced image is scored again and a new champion re-scores everything.

An image whose conformal prediction set holds more than one class is *referred*: it gets a Grad-CAM
overlay (`explain`: referred images by default, or all, or none) and is queued once for a person's
review under `review/queue/`; when a run queued any, the task emits `leukemia_referrals`, which
triggers the review DAG.

The drift watch (`watch.py`) compares the run's images with the champion's training features: each
image over the out-of-distribution threshold is referred, a run that differs as a batch (two-sample
test, at least `LEUKEMIA_DRIFT_MIN_BATCH` images) refers every image and sends a `drift` alert
(`alerts.py`), and `<timestamp>-drift.json` beside the CSV keeps the decision.

Runs when a new champion is promoted (`leukemia_champion`) or new images land
(`leukemia_incoming_images`). Without a champion yet, scoring is skipped. All logic lives in
`include/leukemia` (`tasks/scoring_dag.py` → `scoring.py`); this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task

from leukemia.tasks.assets import champion_asset, incoming_images_asset, referrals_alias
from leukemia.tasks.params import param, s3_params, task_defaults

IO_RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": True}


@dag(
    schedule=(champion_asset() | incoming_images_asset()),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one writer per ledger
    doc_md=__doc__,
    tags=["leukemia", "scoring"],
    default_args=task_defaults(),
    params={
        **s3_params(
            "Bucket holding incoming/ and predictions/.", "incoming/", prefix_key="incoming_prefix"
        ),
        "model_uri": param(
            "",
            type="string",
            title="Model URI",
            description="Empty: models:/<LEUKEMIA_MODEL_NAME>@champion. Else a registered "
            "version of that model that passed the promotion gate: models:/<name>@challenger or "
            "models:/<name>/<version>. Other URIs are refused (use `leukemia predict`).",
        ),
        "batch_size": param(
            32,
            type="integer",
            minimum=1,
            maximum=512,
            title="Batch size",
            description="Images scored at once; bounds the task's memory.",
        ),
        "explain": param(
            "referred",
            type=["string", "boolean"],  # true/false: the older boolean form (all/none)
            enum=["referred", "all", "none", True, False],
            values_display={"true": "all (older form)", "false": "none (older form)"},
            title="Grad-CAM",
            description="Grad-CAM overlays beside the CSV for the referred images (default), "
            "all images, or none.",
        ),
    },
)
def leukemia_scoring() -> None:
    @task.short_circuit(**IO_RETRIES)
    def resolve_model() -> dict[str, str] | None:
        """Pin the model version for this run (the alias may move while it scores)."""
        from leukemia.tasks import scoring_dag as steps

        return steps.champion_or_none(get_current_context()["params"]["model_uri"] or None)

    @task(outlets=[referrals_alias()], **IO_RETRIES)
    def score_new_images(model: dict[str, str]) -> dict[str, Any]:
        """Score; emit `leukemia_referrals` (through the alias) only when images were queued."""
        from leukemia.tasks import scoring_dag as steps

        context = get_current_context()
        params = context["params"]
        result = steps.score(
            str(params["bucket"]),
            str(params["incoming_prefix"]),
            str(params["conn_id"]),
            model["pinned_uri"],
            int(params["batch_size"]),
            params["explain"],
        )
        steps.announce_referrals(context["outlet_events"], result)
        steps.announce_drift(result, context)
        return result

    score_new_images(resolve_model())


leukemia_scoring()
