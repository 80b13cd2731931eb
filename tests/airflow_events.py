"""Reading what DAG runs recorded in the test session's Airflow database (shared by DAG tests)."""

from __future__ import annotations

from typing import Any


def asset_events(name: str, source_run_id: str | None = None) -> list[dict[str, Any]]:
    """The extras of every event of asset `name`, oldest first (of one run when given)."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
        query = query.where(AssetModel.name == name)
        if source_run_id is not None:
            query = query.where(AssetEvent.source_run_id == source_run_id)
        return [dict(e.extra or {}) for e in session.scalars(query.order_by(AssetEvent.id))]
