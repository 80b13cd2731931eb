"""Telling Airflow that @champion moved: an asset event over the REST API, or a clear line why not."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from leukemia import airflow_api

MOVE = {
    "at": "2026-11-27T12:00:00+00:00",
    "from_version": "2",
    "to_version": "1",
    "kind": "rollback",
}


def _airflow(
    calls: list[tuple[str, str, Any]], assets: list[dict[str, Any]], login: int = 201
) -> httpx.Client:
    """An httpx client whose transport answers like Airflow's API and records each call."""

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        calls.append((request.method, request.url.path, body))
        if request.url.path == "/auth/token":
            return httpx.Response(login, json={"access_token": "t0ken"})
        assert request.headers["Authorization"] == "Bearer t0ken"
        if request.url.path == "/api/v2/assets":
            return httpx.Response(200, json={"assets": assets, "total_entries": len(assets)})
        return httpx.Response(200, json={"id": 42, **(body or {})})

    return httpx.Client(base_url="http://airflow:8080", transport=httpx.MockTransport(answer))


def test_a_champion_move_becomes_an_event_on_the_champion_asset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEUKEMIA_AIRFLOW_USERNAME", "dr-lee")
    monkeypatch.setenv("LEUKEMIA_AIRFLOW_PASSWORD", "pw")
    calls: list[tuple[str, str, Any]] = []
    assets = [{"id": 7, "name": "leukemia_champion_old"}, {"id": 3, "name": "leukemia_champion"}]
    event = airflow_api.emit_champion_event(MOVE, _airflow(calls, assets))
    assert event["id"] == 42
    assert calls[0] == ("POST", "/auth/token", {"username": "dr-lee", "password": "pw"})
    assert calls[2] == ("POST", "/api/v2/assets/events", {"asset_id": 3, "extra": MOVE})


def test_without_an_airflow_address_the_move_stands_and_the_line_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LEUKEMIA_AIRFLOW_API_URL", raising=False)
    with pytest.raises(airflow_api.NotNotified) as err:
        airflow_api.emit_champion_event(MOVE)
    text = str(err.value)
    assert "LEUKEMIA_AIRFLOW_API_URL is not set" in text and "@champion has moved" in text
    assert "trigger leukemia_scoring" in text and "\n" not in text


@pytest.mark.parametrize(
    ("assets", "login", "expected"),
    [
        ([{"id": 3, "name": "leukemia_champion"}], 401, "login as (no user) answered 401"),
        ([], 201, "Airflow knows no asset leukemia_champion"),
    ],
)
def test_a_refused_login_or_a_missing_asset_is_not_notified(
    monkeypatch: pytest.MonkeyPatch, assets: list, login: int, expected: str
) -> None:
    monkeypatch.delenv("LEUKEMIA_AIRFLOW_USERNAME", raising=False)
    with pytest.raises(airflow_api.NotNotified, match=re.escape(expected)):
        airflow_api.emit_champion_event(MOVE, _airflow([], assets, login))


def test_an_unreachable_airflow_is_not_notified(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed when the block ends
    monkeypatch.setenv("LEUKEMIA_AIRFLOW_API_URL", url)
    with pytest.raises(airflow_api.NotNotified, match=f"cannot reach {url}"):
        airflow_api.emit_champion_event(MOVE)
