"""Telling Airflow, from outside it, that `@champion` moved: an asset event over the REST API.

A rollback from the command line moves the alias in MLflow itself, so it works while Airflow is
down (a rollback is what one does when things go wrong). Then it posts an event on the
`leukemia_champion` asset (`POST /api/v2/assets/events`), which triggers the scoring DAG exactly as
the training DAG's `promote` task does. Posting the event, rather than triggering a DAG that would
move the alias, keeps the move independent of Airflow and needs only the right to create asset
events. Where Airflow cannot be told, the move stands and `NotNotified` says what to do.
"""

from __future__ import annotations

import logging
from typing import Any

from leukemia.config import env

log = logging.getLogger(__name__)

CHAMPION_ASSET = "leukemia_champion"


class NotNotified(RuntimeError):
    """The alias moved, but Airflow was not told; the message says what to do instead."""


def _fail(why: str) -> NotNotified:
    return NotNotified(
        f"Airflow was not notified ({why}); @champion has moved all the same, and the scoring DAG "
        "uses the new champion from its next run. To re-score now, trigger leukemia_scoring in "
        "the Airflow UI, or set LEUKEMIA_AIRFLOW_API_URL, LEUKEMIA_AIRFLOW_USERNAME and "
        "LEUKEMIA_AIRFLOW_PASSWORD and run the same rollback command again"
    )


def http_client(url: str) -> Any:
    """An HTTP client on the Airflow API at `url`."""
    import httpx

    return httpx.Client(base_url=url.rstrip("/"), timeout=15)


def _token(http: Any, username: str, password: str) -> str:
    answer = http.post("/auth/token", json={"username": username, "password": password})
    if answer.status_code not in (200, 201):
        raise _fail(f"login as {username or '(no user)'} answered {answer.status_code}")
    return str(answer.json()["access_token"])


def emit_asset_event(
    asset_name: str, extra: dict[str, Any], http: Any = None, url: str | None = None
) -> dict[str, Any]:
    """Post an event on the asset named `asset_name`; returns Airflow's record of the event.

    `http` is an `httpx.Client` on the API's address (the tests pass FastAPI's test client);
    without one, `LEUKEMIA_AIRFLOW_API_URL` is used. Every failure raises `NotNotified`.
    """
    import httpx

    url = url if url is not None else env("LEUKEMIA_AIRFLOW_API_URL")
    if http is None and not url:
        raise _fail("LEUKEMIA_AIRFLOW_API_URL is not set")
    own = http is None
    http = http or http_client(url)
    try:
        token = _token(http, env("LEUKEMIA_AIRFLOW_USERNAME"), env("LEUKEMIA_AIRFLOW_PASSWORD"))
        headers = {"Authorization": f"Bearer {token}"}
        found = http.get("/api/v2/assets", params={"name_pattern": asset_name}, headers=headers)
        if found.status_code != 200:
            raise _fail(f"listing assets answered {found.status_code}")
        ids = [a["id"] for a in found.json().get("assets", []) if a.get("name") == asset_name]
        if not ids:
            raise _fail(f"Airflow knows no asset {asset_name}: is the scoring DAG deployed?")
        posted = http.post(
            "/api/v2/assets/events", json={"asset_id": ids[0], "extra": extra}, headers=headers
        )
        if posted.status_code not in (200, 201):
            raise _fail(f"posting the event answered {posted.status_code}: {posted.text[:200]}")
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {url}: {exc}") from None
    finally:
        if own:
            http.close()
    event = posted.json()
    log.info("Asset event %s on %s", event.get("id"), asset_name)
    return event


def emit_champion_event(move: dict[str, Any], http: Any = None) -> dict[str, Any]:
    """The `leukemia_champion` asset event for one move of `@champion` (a `registry.AliasMove`)."""
    return emit_asset_event(CHAMPION_ASSET, {k: str(v) for k, v in move.items()}, http)
