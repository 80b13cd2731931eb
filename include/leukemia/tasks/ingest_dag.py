"""The step of the `leukemia_ingest` DAG: upload a local folder of class folders to the raw prefix."""

from __future__ import annotations

from typing import Any


def upload(source: str, bucket: str, prefix: str, conn_id: str) -> dict[str, Any]:
    """Upload `<source>/<Class>/<name>` images; the count and the source go into the asset event."""
    from leukemia.storage import upload_folder

    if not source:
        raise ValueError(
            "set the `source` Param to a folder of <Benign|Early|Pre|Pro>/<name>.jpg images"
        )
    return {"uploaded": upload_folder(source, bucket, prefix, conn_id=conn_id), "source": source}
