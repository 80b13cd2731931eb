"""The scoring ledger: what one model version has scored or rejected, kept in S3 beside its predictions.

`predictions/ledger/v<version>.json` maps each image key to the ETag that version scored (with the
CSV that holds the row) or rejected (with the reason), and makes scoring incremental: `pending`
names the images whose current ETag is in neither. The ledger is written with an S3 conditional
write (`If-Match` its ETag, `If-None-Match: *` for a new one), so two overlapping scoring runs cannot
lose each other's entries: the run that loses the race reads the ledger again, merges (the newer
entry per key wins) and writes again, a bounded number of times.

A scored entry also keeps what the version answered (`scored_entry`): the calibrated confidence,
the prediction set and whether the image was referred to a person, and why. Entries written before
prediction sets existed lack these fields; readers take them as absent, not as "not referred".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

#: Where scoring writes: `<prefix>v<version>/` for the CSVs, `<prefix>ledger/` for the ledgers.
PREDICTIONS_PREFIX = "predictions/"
LEDGER_FOLDER = "ledger"
#: Conditional writes tried before giving up (each conflict means another run wrote in between).
WRITE_ATTEMPTS = 5
#: S3 answers to a conditional write that lost: 412 the ETag moved (or the object appeared), 409 a
#: concurrent conditional write is in flight, NoSuchKey the ledger was deleted meanwhile.
CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"})
SECTIONS = ("scored", "rejected")
#: The runs' drift reports: CSV key → the report (kept beside the per-image sections).
BATCHES = "batches"
#: The time each kind of entry was made, compared when two runs recorded the same key.
ENTRY_TIME = {"scored": "scored_at", "rejected": "rejected_at"}
_OLDEST = datetime.min.replace(tzinfo=UTC)


class LedgerConflict(RuntimeError):
    """The ledger kept changing under this run for every attempt."""


def version_folder(model_version: str) -> str:
    """`v3` for a registry version; a URI (no registry version) becomes a safe folder name."""
    if model_version.isdigit():
        return f"v{model_version}"
    import hashlib

    return "uri-" + hashlib.sha256(model_version.encode()).hexdigest()[:12]


def ledger_key(model_version: str, predictions_prefix: str = PREDICTIONS_PREFIX) -> str:
    """The ledger object of a model version."""
    return f"{predictions_prefix}{LEDGER_FOLDER}/{version_folder(model_version)}.json"


def empty_ledger() -> dict[str, Any]:
    return {"scored": {}, "rejected": {}}


def scored_entry(etag: str, csv_key: str, scored_at: str, prediction: Any) -> dict[str, Any]:
    """The ledger entry of one scored image: its ETag, the CSV holding its row, when, and the
    answer (`predict.Prediction`): confidence, prediction set (`Pre|Pro`), refer and the reason."""
    return {
        "etag": etag,
        "csv": csv_key,
        "scored_at": scored_at,
        "confidence": round(float(prediction.confidence), 6),
        "prediction_set": prediction.set_label,
        "refer": bool(prediction.refer),
        "refer_reason": prediction.refer_reason,
    }


def read_ledger(client: Any, bucket: str, key: str) -> tuple[dict[str, Any], str | None]:
    """The ledger and its ETag; an empty ledger and None when this version has scored nothing yet."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except client.exceptions.NoSuchKey:
        return empty_ledger(), None
    ledger = json.loads(response["Body"].read())
    for section in SECTIONS:
        ledger.setdefault(section, {})
    return ledger, str(response["ETag"])


def pending(listing: Mapping[str, str], ledger: Mapping[str, Any]) -> list[str]:
    """Keys (sorted) whose current ETag this version has neither scored nor rejected."""
    seen = {k: v["etag"] for k, v in ledger["rejected"].items()}
    seen.update({k: v["etag"] for k, v in ledger["scored"].items()})
    return sorted(k for k, etag in listing.items() if seen.get(k) != etag)


def _entry_time(section: str, entry: Mapping[str, Any]) -> datetime:
    """When the entry was made; entries written before times were recorded count as oldest."""
    value = entry.get(ENTRY_TIME[section])
    try:
        stamp = datetime.fromisoformat(str(value)) if value else _OLDEST
    except ValueError:
        return _OLDEST
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def merge(stored: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """The union of both ledgers' entries; where both hold a key, the newer entry wins.

    A key lives in one section only (an image scored after it was rejected is no longer rejected),
    so the newest entry across both sections decides. On equal times `changes` wins.
    """
    newest: dict[str, tuple[datetime, int, str, dict[str, Any]]] = {}
    for rank, ledger in enumerate((stored, changes)):
        for section in SECTIONS:
            for key, entry in ledger.get(section, {}).items():
                candidate = (_entry_time(section, entry), rank, section, dict(entry))
                if key not in newest or candidate[:2] >= newest[key][:2]:
                    newest[key] = candidate
    merged = {k: v for k, v in stored.items() if k not in SECTIONS}
    # each scoring run's drift report, by its CSV key (`watch.DriftReport.as_dict`)
    merged[BATCHES] = {**stored.get(BATCHES, {}), **changes.get(BATCHES, {})}
    merged.update({section: {} for section in SECTIONS})
    for key in sorted(newest):
        _, _, section, entry = newest[key]
        merged[section][key] = entry
    return merged


def conditional_write_lost(exc: Exception, codes: Collection[str] = CONFLICT_CODES) -> bool:
    """True when a conditional S3 write (IfMatch / IfNoneMatch) failed because another writer got
    there first: one of `codes`, or HTTP 409 / 412 (the ledger and the review queue share it)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return exc.response.get("Error", {}).get("Code") in codes or status in (409, 412)


def _put_if_unchanged(
    client: Any, bucket: str, key: str, ledger: Mapping[str, Any], etag: str | None
) -> None:
    """Write `ledger` only if the stored one still has `etag` (None: only if there is none yet)."""
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    client.put_object(
        Bucket=bucket,
        Key=key,
        Body=json.dumps(ledger, indent=1, sort_keys=True).encode(),
        ContentType="application/json",
        **condition,
    )


def write_ledger(
    client: Any,
    bucket: str,
    key: str,
    changes: Mapping[str, Any],
    base: tuple[dict[str, Any], str | None] | None = None,
    details: Mapping[str, str] | None = None,
    attempts: int = WRITE_ATTEMPTS,
) -> dict[str, Any]:
    """Add this run's entries (`changes`) to the stored ledger without losing anyone else's.

    `base` is the ledger and ETag this run read earlier (None: read it now); `details` are top-level
    fields to set (model URI and version). On a conflict the ledger is read again and merged, up to
    `attempts` writes; returns the ledger as written.
    """
    stored, etag = base if base is not None else read_ledger(client, bucket, key)
    for attempt in range(1, attempts + 1):
        ledger = merge(stored, changes)
        ledger.update(details or {})
        ledger["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            _put_if_unchanged(client, bucket, key, ledger, etag)
            return ledger
        except Exception as exc:
            if not conditional_write_lost(exc):
                raise
            log.info(
                "s3://%s/%s changed while this run scored (attempt %d/%d): merging and writing again",
                bucket,
                key,
                attempt,
                attempts,
            )
        stored, etag = read_ledger(client, bucket, key)
    raise LedgerConflict(
        f"s3://{bucket}/{key} changed under every one of {attempts} writes: other scoring runs keep "
        "writing it. The predictions CSV is written; retry the task (its images are scored again "
        "and recorded), and keep one scoring run at a time per model version (max_active_runs=1)"
    )
