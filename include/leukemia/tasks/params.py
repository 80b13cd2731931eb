"""DAG Params shared by the DAGs: typed, titled and described, with environment defaults."""

from __future__ import annotations

from typing import Any

from leukemia.config import env


def s3_params(
    bucket_description: str, prefix: str | None = None, prefix_key: str = "prefix"
) -> dict[str, Any]:
    """`bucket`, a prefix and `conn_id` Params (the prefix defaults to the raw-image prefix)."""
    from airflow.sdk import Param

    return {
        "bucket": Param(
            env("LEUKEMIA_BUCKET"), type="string", title="S3 bucket", description=bucket_description
        ),
        prefix_key: Param(
            prefix if prefix is not None else env("LEUKEMIA_RAW_PREFIX"),
            type="string",
            title="S3 prefix",
            description="Prefix of the images, e.g. raw/ (class folders below it) or incoming/.",
        ),
        "conn_id": Param(
            env("LEUKEMIA_AWS_CONN_ID"),
            type="string",
            title="AWS connection",
            description="Airflow connection used by the S3 hook.",
        ),
    }
