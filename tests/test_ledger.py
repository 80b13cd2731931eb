"""leukemia.ledger: what a model version has scored, merged and written with an S3 condition."""

from __future__ import annotations

import json
from typing import Any

import pytest

from leukemia.ledger import (
    LedgerConflict,
    empty_ledger,
    ledger_key,
    merge,
    pending,
    read_ledger,
    scored_entry,
    write_ledger,
)

KEY = ledger_key("3")
DETAILS = {"model_uri": "models:/leukemia-classifier/3", "model_version": "3"}


def _scored(etag: str, at: str = "2026-03-01T10:00:00+00:00") -> dict[str, str]:
    return {"etag": etag, "csv": "predictions/v3/run.csv", "scored_at": at}


def _changes(**scored: dict[str, str]) -> dict[str, Any]:
    return {"scored": {f"incoming/{k}.jpg": v for k, v in scored.items()}, "rejected": {}}


def _stored(client: Any, bucket: str) -> dict[str, Any]:
    return json.loads(client.get_object(Bucket=bucket, Key=KEY)["Body"].read())


@pytest.fixture()
def client(bucket: str) -> Any:
    from leukemia.storage import s3_client

    return s3_client("aws_default")


def test_merge_keeps_every_key_and_the_newer_entry_of_a_key_in_both() -> None:
    stored = {
        "scored": {
            "incoming/a.jpg": _scored("a1"),
            "incoming/b.jpg": _scored("b2", "2026-03-01T12:00:00+00:00"),
            "incoming/legacy.jpg": {"etag": "l1", "csv": "old.csv"},  # no time: written before
        },
        "rejected": {"incoming/c.jpg": {"etag": "c1", "reason": "not an image"}},
        "model_version": "3",
    }
    changes = {
        "scored": {
            "incoming/b.jpg": _scored("b1", "2026-03-01T11:00:00+00:00"),  # older than stored
            "incoming/c.jpg": _scored("c2"),  # replaced, now scored
            "incoming/d.jpg": _scored("d1"),
        },
        "rejected": {
            "incoming/legacy.jpg": {
                "etag": "l2",
                "reason": "truncated",
                "rejected_at": "2026-03-01T10:00:00+00:00",
            }
        },
    }
    merged = merge(stored, changes)
    assert {k: v["etag"] for k, v in merged["scored"].items()} == {
        "incoming/a.jpg": "a1",
        "incoming/b.jpg": "b2",
        "incoming/c.jpg": "c2",
        "incoming/d.jpg": "d1",
    }
    assert {k: v["etag"] for k, v in merged["rejected"].items()} == {"incoming/legacy.jpg": "l2"}
    assert merged["model_version"] == "3"
    assert pending({"incoming/b.jpg": "b1", "incoming/a.jpg": "a1"}, merged) == ["incoming/b.jpg"]


@pytest.mark.parametrize("existing", [False, True], ids=["new ledger", "existing ledger"])
def test_two_overlapping_writers_both_keep_their_entries(
    client: Any, bucket: str, existing: bool
) -> None:
    """Both runs read the ledger, then both write: the second write must not drop the first's
    entries (an unconditional put of what the second run read plus its own entries does)."""
    if existing:
        write_ledger(client, bucket, KEY, _changes(old=_scored("o1")), details=DETAILS)
    read_by_first = read_ledger(client, bucket, KEY)
    read_by_second = read_ledger(client, bucket, KEY)
    write_ledger(client, bucket, KEY, _changes(first=_scored("f1")), read_by_first, DETAILS)
    write_ledger(client, bucket, KEY, _changes(second=_scored("s1")), read_by_second, DETAILS)
    stored = _stored(client, bucket)
    expected = {"incoming/first.jpg", "incoming/second.jpg"} | (
        {"incoming/old.jpg"} if existing else set()
    )
    assert set(stored["scored"]) == expected
    assert stored["model_version"] == "3" and stored["rejected"] == {}


def test_a_write_against_a_stale_etag_is_refused_by_the_store(client: Any, bucket: str) -> None:
    """The condition is enforced by S3 itself (here the moto server), not only by this module."""
    from botocore.exceptions import ClientError

    write_ledger(client, bucket, KEY, _changes(a=_scored("a1")))
    _, etag = read_ledger(client, bucket, KEY)
    write_ledger(client, bucket, KEY, _changes(b=_scored("b1")))
    for condition in ({"IfMatch": etag}, {"IfNoneMatch": "*"}):
        with pytest.raises(ClientError, match="PreconditionFailed"):
            client.put_object(Bucket=bucket, Key=KEY, Body=b"{}", **condition)
    assert set(_stored(client, bucket)["scored"]) == {"incoming/a.jpg", "incoming/b.jpg"}


class _AlwaysOvertaken:
    """An S3 client on which another run writes the ledger just before each of this run's puts."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client, self._bucket, self.puts = client, bucket, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_object(self, **kwargs: Any) -> Any:
        self.puts += 1
        other = _changes(**{f"other{self.puts}": _scored(f"x{self.puts}")})
        write_ledger(self._client, self._bucket, KEY, other)
        return self._client.put_object(**kwargs)


def test_a_ledger_that_keeps_changing_stops_after_bounded_attempts(
    client: Any, bucket: str
) -> None:
    racing = _AlwaysOvertaken(client, bucket)
    with pytest.raises(LedgerConflict, match="changed under every one of 3 writes.*retry the task"):
        write_ledger(racing, bucket, KEY, _changes(mine=_scored("m1")), attempts=3)
    assert racing.puts == 3
    assert "incoming/mine.jpg" not in _stored(client, bucket)["scored"]


def test_reading_a_missing_ledger_gives_an_empty_one_and_no_etag(client: Any, bucket: str) -> None:
    assert read_ledger(client, bucket, KEY) == (empty_ledger(), None)


def test_a_scored_entry_keeps_the_answer_through_a_merge_and_a_write(
    client: Any, bucket: str
) -> None:
    from leukemia.predict import Prediction

    referred = Prediction(
        "s3://b/incoming/a.jpg", "Pre", (0.05, 0.02, 0.55, 0.38), "3", ("Pre", "Pro"), True, "why"
    )
    entry = scored_entry("a1", "predictions/v3/run.csv", "2026-03-01T10:00:00+00:00", referred)
    assert entry == {
        "etag": "a1",
        "csv": "predictions/v3/run.csv",
        "scored_at": "2026-03-01T10:00:00+00:00",
        "confidence": 0.55,
        "prediction_set": "Pre|Pro",
        "refer": True,
        "refer_reason": "why",
    }
    write_ledger(client, bucket, KEY, _changes(old=_scored("o1")))
    write_ledger(client, bucket, KEY, _changes(a=entry))
    stored = _stored(client, bucket)["scored"]
    assert stored["incoming/a.jpg"] == entry and "refer" not in stored["incoming/old.jpg"]
