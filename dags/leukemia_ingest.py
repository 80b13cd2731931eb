"""
# Leukaemia images: ingest a folder

Uploads a folder of images in the public data set's layout (`<Benign|Early|Pre|Pro>/<name>.jpg`) to
the raw-image prefix and emits the `leukemia_raw_images` asset event, which triggers
`leukemia_training`. In production, S3 event notifications through SQS do the same without this DAG.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task

from leukemia.tasks.assets import raw_images_asset
from leukemia.tasks.params import param, s3_params


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    doc_md=__doc__,
    tags=["leukemia", "ingest"],
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=20),
        "retry_exponential_backoff": True,
    },
    params={
        "source": param(
            "",
            type="string",
            title="Folder",
            description="Local folder with <Class>/<name>.jpg images.",
        ),
        **s3_params("Bucket the images are uploaded to."),
    },
)
def leukemia_ingest() -> None:
    @task(outlets=[raw_images_asset()])
    def upload_images() -> dict[str, Any]:
        from leukemia.tasks import ingest_dag as steps

        context = get_current_context()
        params = context["params"]
        done = steps.upload(params["source"], params["bucket"], params["prefix"], params["conn_id"])
        context["outlet_events"][raw_images_asset()].extra = done
        return done

    upload_images()


leukemia_ingest()
