"""Airflow assets the DAGs share: the raw-image prefix (new images trigger training), the champion
model and the incoming-image prefix (either triggers batch scoring), and the review queue (images
that scoring referred to a person trigger the review)."""

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


def referrals_asset() -> Any:
    """`s3://<bucket>/<LEUKEMIA_REVIEW_PREFIX>`: the review queue, updated when scoring queued at
    least one referred image (through `referrals_alias`, so a run that queued none emits nothing)."""
    from airflow.sdk import Asset

    prefix = env("LEUKEMIA_REVIEW_PREFIX").strip("/")
    return Asset(name="leukemia_referrals", uri=f"s3://{env('LEUKEMIA_BUCKET')}/{prefix}/")


def referrals_alias() -> Any:
    """The scoring task's outlet: an alias that becomes a `referrals_asset` event only when the
    task adds one (an outlet asset itself would emit on every successful run)."""
    from airflow.sdk import AssetAlias

    return AssetAlias(name="leukemia_referrals_queued")
