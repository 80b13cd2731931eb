"""
# Leukaemia images: a haematologist labels what the classifier referred

Scoring refers every image whose prediction set holds more than one class (or that was referred
for another reason) and queues it under `s3://<bucket>/review/queue/`. This DAG takes the oldest
pending images (at most `LEUKEMIA_REVIEW_BATCH`, default 10) into one form, which waits in
**Required Actions** (up to `LEUKEMIA_REVIEW_TIMEOUT_HOURS`, default 24 h): for each image the
reviewer sees the model's probabilities, its prediction set, why it was referred and links to the
image and its Grad-CAM overlay, and answers a class, *unusable* or *skip (ask again later)*.

Each class given copies the image to `raw/<Class>/review-<sha12>.<ext>` with its provenance beside
it (who, when, what the model said) and emits the `leukemia_raw_images` asset, so the next training
learns from it. Unusable images are recorded and never asked again; skipped, refused and
unanswered (timed-out) ones come back in the next form.

Runs when scoring queues referrals (`leukemia_referrals`) and by hand; one form at a time. An open
form and a failed task alert the deployment's recipients (`LEUKEMIA_ALERT_*`, docs/alerts.md). All
logic lives in `include/leukemia` (`tasks/review_dag.py` → `review.py`); this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from leukemia import alerts
from leukemia.tasks.assets import raw_images_asset, referrals_asset
from leukemia.tasks.params import s3_params, task_defaults
from leukemia.tasks.review_dag import ReviewFormOperator, labels_alias

IO_RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": True}


@dag(
    schedule=referrals_asset(),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one open form at a time
    doc_md=__doc__,
    tags=["leukemia", "review"],
    default_args=task_defaults(),
    params={
        k: v
        for k, v in s3_params("Bucket holding review/ and raw/.").items()
        if k in ("bucket", "conn_id")
    },
)
def leukemia_review() -> None:
    @task(**IO_RETRIES)
    def open_form() -> str:
        """Claim the oldest pending images; skip the run when none is pending."""
        from leukemia.tasks import review_dag as steps

        context = get_current_context()
        params = context["params"]
        key = steps.open_form(params["bucket"], params["conn_id"], context["run_id"])
        if not key:
            raise AirflowSkipException("no referred image waits for review")
        return key

    review = ReviewFormOperator(
        task_id="review", form_task_id="open_form", notifiers=alerts.notifiers(alerts.Event.REVIEW)
    )

    @task(outlets=[labels_alias()], **IO_RETRIES)
    def apply_labels(answer: dict[str, Any]) -> dict[str, Any]:
        """Write the labelled images to raw/; announce them to training when any landed."""
        from leukemia.tasks import review_dag as steps

        context = get_current_context()
        params = context["params"]
        done = steps.apply_labels(params["bucket"], params["conn_id"], answer)
        if done["raw_keys"]:
            extra = {"labelled": done["labelled"], "form": done["form"]}
            context["outlet_events"][labels_alias()].add(raw_images_asset(), extra=extra)
        return done

    open_form() >> review
    apply_labels(review.output)


leukemia_review()
