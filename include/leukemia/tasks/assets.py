"""Airflow assets the DAGs share: the raw-image prefix (new images trigger training), the champion
model and the incoming-image prefix (either triggers batch scoring)."""

from __future__ import annotations

from typing import Any

from leukemia.config import env


def raw_images_asset() -> Any:
    """`s3://<bucket>/<prefix>`: updated by the ingest DAG or, in production, by S3 → SQS events."""
    from airflow.sdk import Asset

    prefix = env("LEUKEMIA_RAW_PREFIX").strip("/")
    return Asset(uri=f"s3://{env('LEUKEMIA_BUCKET')}/{prefix}/", name="leukemia_raw_images")


def champion_asset() -> Any:
    """The registered model's champion alias, updated when `@champion` moves (the training DAG's
    `promote`, the `leukemia_champion` DAG's rollback, or the CLI's rollback over the REST API)."""
    from airflow.sdk import Asset

    return Asset(
        name="leukemia_champion", uri=f"mlflow-model://{env('LEUKEMIA_MODEL_NAME')}/champion"
    )


def incoming_images_asset() -> Any:
    """`s3://<bucket>/incoming/`: images waiting to be scored (updated by S3 → SQS events or by hand)."""
    from airflow.sdk import Asset

    return Asset(uri=f"s3://{env('LEUKEMIA_BUCKET')}/incoming/", name="leukemia_incoming_images")
