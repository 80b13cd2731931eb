"""Batch scoring: classify the images under `s3://<bucket>/incoming/` that this model version has
not scored yet, and write the predictions as a CSV next to them.

Layout in the bucket (one model version = one folder; nothing is ever deleted or rewritten except
the ledger):

    incoming/<any>/<name>.jpg                    images to score (any depth, image suffixes)
    predictions/v<version>/<timestamp>.csv       one CSV per run that scored something
    predictions/v<version>/<timestamp>-gradcam/  Grad-CAM overlays and contact sheet
    predictions/ledger/v<version>.json           what that version has scored: key → ETag
    review/queue/<sha256>.json                   referred images waiting for a person (review.py)

Each row carries the calibrated confidence, the conformal prediction set (`Pre|Pro`) and whether
the image is referred to a person (`refer`, `refer_reason`); see docs/predict.md. Grad-CAM overlays
are written for the referred images (`explain="referred"`, the default), every image (`all`) or
none; a row's `overlay` names its overlay's key. Each referred image is queued for review
(`review.enqueue`), once per image content (sha256) whatever the run or model version, so an
overlapping run, a retry after a kill, or a new champion re-scoring the prefix never asks twice.

The ledger (`ledger.py`) makes runs incremental: an object is scored when its key is not in the
version's ledger or its ETag changed (the image was replaced). Images that cannot be decoded are
recorded too, with the reason, so they are not retried every run until they are replaced; failed
downloads are not recorded and are retried next run. The CSV is uploaded before the ledger, so a run killed in
between scores those images again next time: predictions are at-least-once, and a consumer keeps
the latest `scored_at` per (key, model_version). A new champion has an empty ledger, so it
re-scores everything under the prefix. The ledger is written with a condition on its ETag, so
overlapping runs both keep their entries.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES
from leukemia.ledger import (
    BATCHES,
    PREDICTIONS_PREFIX,
    empty_ledger,
    ledger_key,
    pending,
    read_ledger,
    scored_entry,
    version_folder,
    write_ledger,
)

log = logging.getLogger(__name__)

#: The columns of a scoring CSV; those added with the prediction sets come last, so readers that
#: go by position keep working.
CSV_COLUMNS = (
    "key",
    "class",
    *CLASSES,
    "malignant",
    "model_version",
    "scored_at",
    "confidence",
    "prediction_set",
    "refer",
    "refer_reason",
    "overlay",
    "ood_score",
    "batch_drift",
)
PROGRESS_EVERY = 500
#: Which images get a Grad-CAM overlay: the referred ones (default), every one, or none.
EXPLAIN_MODES = ("referred", "all", "none")


def explain_mode(value: str | bool | None) -> str:
    """`referred`, `all` or `none`; the boolean of the older `explain` setting (a run conf of
    `true`/`false`) means `all`/`none`, and an empty value the default."""
    if isinstance(value, bool):
        return "all" if value else "none"
    text = str(value or "").strip().lower()
    text = {"true": "all", "false": "none", "": "referred"}.get(text, text)
    if text not in EXPLAIN_MODES:
        raise ValueError(
            f"explain must be one of {', '.join(EXPLAIN_MODES)} (or true/false), got {value!r}"
        )
    return text


@dataclass
class ScoringResult:
    """What one scoring run did (small: fits in XCom)."""

    model_uri: str
    model_version: str
    listed: int = 0
    already_scored: int = 0
    scored: int = 0
    skipped: int = 0
    failed: int = 0
    referred: int = 0
    queued: int = 0
    explain: str = "referred"
    predictions_uri: str = ""
    gradcam_uri: str = ""
    ledger_uri: str = ""
    drift: dict[str, Any] = field(default_factory=dict)  # `watch.DriftReport.as_dict()`
    drift_uri: str = ""
    seconds: float = 0.0
    skipped_keys: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Outputs:
    """Where one run writes in the bucket: a CSV and, when asked, a Grad-CAM folder beside it."""

    bucket: str
    folder: str  # predictions/v<version>
    stamp: str  # <UTC timestamp>-<id>, unique per run

    @property
    def csv_key(self) -> str:
        return f"{self.folder}/{self.stamp}.csv"

    @property
    def gradcam_prefix(self) -> str:
        return f"{self.folder}/{self.stamp}-gradcam/"

    @property
    def drift_key(self) -> str:
        return f"{self.folder}/{self.stamp}-drift.json"


def list_images(client: Any, bucket: str, prefix: str) -> dict[str, str]:
    """key → ETag of every image object under `prefix`."""
    from leukemia.images import is_image_name
    from leukemia.storage import list_objects

    return {
        o["Key"]: str(o["ETag"]).strip('"')
        for o in list_objects(client, bucket, prefix)
        if is_image_name(o["Key"]) and int(o.get("Size", 1)) > 0
    }


def _list_incoming(client: Any, bucket: str, prefix: str, conn_id: str) -> dict[str, str]:
    """`list_images`, with an error that says what to check."""
    try:
        return list_images(client, bucket, prefix)
    except Exception as exc:
        raise RuntimeError(
            f"cannot list s3://{bucket}/{prefix} through connection {conn_id!r}: {exc}. Check that the "
            "bucket exists and the connection's credentials and endpoint_url"
        ) from exc


def score_incoming(
    bucket: str,
    prefix: str = "incoming/",
    conn_id: str = "aws_default",
    model_uri: str | None = None,
    batch_size: int = 32,
    explain: str | bool = "referred",
    predictions_prefix: str = PREDICTIONS_PREFIX,
    client: Any | None = None,
) -> ScoringResult:
    """Score the images under `s3://bucket/prefix` that this model version has not scored yet.

    Streams `batch_size` images at a time; the rows go to a local temporary file and the drift
    watch keeps a bounded sample, so memory stays bounded however many images are pending. Once
    the run's drift decision is known (`watch.Watch`), the CSV is written and the referred images
    are queued for review (`explain_mode(explain)` says which get a Grad-CAM overlay). The ledger
    is updated last, with a condition that keeps the entries of a scoring run that overlapped
    this one.
    """
    from leukemia import predict, registry
    from leukemia.storage import s3_client

    started = time.monotonic()
    mode = explain_mode(explain)
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    client = client or s3_client(conn_id)
    # the shared prediction store gets only gated, registered versions (checked and verified)
    model = predict.load_model(registry.resolve_served(model_uri))
    result = ScoringResult(model.ref.pinned_uri, model.version, explain=mode)
    ledger_at = ledger_key(model.version, predictions_prefix)
    result.ledger_uri = f"s3://{bucket}/{ledger_at}"
    listing = _list_incoming(client, bucket, prefix, conn_id)
    base = read_ledger(client, bucket, ledger_at)
    todo = pending(listing, base[0])
    result.listed, result.already_scored = len(listing), len(listing) - len(todo)
    name = model.ref.describe()
    if not listing:
        log.info("No images under s3://%s/%s: nothing to score, nothing referred", bucket, prefix)
        result.seconds = round(time.monotonic() - started, 3)
        return result
    log.info(
        "s3://%s/%s: %d images, %d already scored by %s, %d to score",
        bucket,
        prefix,
        result.listed,
        result.already_scored,
        name,
        len(todo),
    )
    if todo:
        outputs = Outputs(bucket, f"{predictions_prefix}{version_folder(model.version)}", _stamp())
        changes = _score(client, model, listing, todo, outputs, batch_size, mode, result)
        details = {"model_uri": model.ref.pinned_uri, "model_version": model.version}
        write_ledger(client, bucket, ledger_at, changes, base, details)
    result.seconds = round(time.monotonic() - started, 3)
    if todo:
        _log_summary(result, name)
    return result


def _stamp() -> str:
    """A run's unique name: its UTC start time and a short random id."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{uuid.uuid4().hex[:6]}"


def _score(
    client: Any,
    model: Any,
    listing: dict[str, str],
    todo: list[str],
    outputs: Outputs,
    batch_size: int,
    explain: str,
    result: ScoringResult,
) -> dict[str, Any]:
    """Score `todo` batch by batch (overlays as it goes, the rows spooled to a local file), decide
    the run's drift (`watch.Watch`), then write the CSV, queue the referred images and upload;
    return the ledger entries."""
    from leukemia import predict
    from leukemia.watch import Watch

    digests: dict[str, str] = {}  # image name → sha256 of the bytes scored
    sources = [_hashed(predict.s3_source(client, outputs.bucket, k), digests) for k in todo]
    key_of = {s.name: k for s, k in zip(sources, todo, strict=True)}
    changes = empty_ledger()
    watch = Watch(model.reference, model.background)
    with tempfile.TemporaryDirectory(prefix="leukemia-scoring-") as tmp:
        explainer = _explainer(model, Path(tmp)) if explain != "none" else None
        spool = Path(tmp) / "predictions.jsonl"
        with open(spool, "w") as fh:
            for batch in predict.iter_batches(model, sources, batch_size):
                if explainer is not None:
                    batch.predictions = _upload_overlays(client, explainer, batch, outputs, explain)
                if batch.features is not None:
                    classes = [CLASSES.index(p.label) for p in batch.predictions]
                    watch.observe(batch.features, batch.pixels, classes, batch.ood_flagged)
                _spool(fh, batch, key_of, digests)
                _reject(batch, key_of, listing, changes, result)
                done = result.scored + result.skipped + result.failed
                if done % PROGRESS_EVERY < batch_size:
                    log.info("Scored %d/%d images", done, len(todo))
        report = watch.decide()
        result.drift = report.as_dict()
        log.info("%s", report.line())
        csv_path = Path(tmp) / "predictions.csv"
        _write_rows(client, spool, csv_path, report, listing, outputs, changes, result)
        if result.scored:
            _upload_csv(client, csv_path, outputs, result)
            _upload_drift_report(client, outputs, result)
            changes[BATCHES] = {outputs.csv_key: result.drift}
        if explainer is not None:
            _upload_contact_sheet(client, explainer, model.ref.describe(), outputs, result)
    return changes


def _hashed(source: Any, digests: dict[str, str]) -> Any:
    """The source, recording the sha256 of the bytes it reads (the review queue's identity)."""
    import hashlib

    def read() -> bytes:
        data = source.read()
        digests[source.name] = hashlib.sha256(data).hexdigest()
        return data

    return replace(source, read=read)


def _spool(fh: Any, batch: Any, key_of: dict[str, str], digests: dict[str, str]) -> None:
    """The batch's predictions as JSON lines (key, sha256, time, prediction) until the run's drift
    decision is known."""
    import json
    from dataclasses import asdict

    for p in batch.predictions:
        row = {"key": key_of[p.image], "sha256": digests.pop(p.image, ""), "at": batch.scored_at}
        fh.write(json.dumps({**row, "prediction": asdict(p)}) + "\n")
    for skipped in batch.skipped:
        digests.pop(skipped.image, None)


def _spooled(spool: Path) -> Any:
    """(key, sha256, scored_at, Prediction) of each spooled line."""
    import json

    from leukemia.predict import Prediction

    with open(spool) as fh:
        for line in fh:
            item = json.loads(line)
            fields = item["prediction"]
            for name in ("probabilities", "prediction_set"):
                fields[name] = tuple(fields[name])
            yield item["key"], item["sha256"], item["at"], Prediction(**fields)


def _reject(
    batch: Any,
    key_of: dict[str, str],
    listing: dict[str, str],
    changes: dict[str, Any],
    result: ScoringResult,
) -> None:
    """The batch's counts and rejects; failed reads are not recorded, so the next run retries them."""
    result.scored += len(batch.predictions)
    for s in batch.skipped:
        key = key_of[s.image]
        result.skipped_keys.append({"key": key, "reason": s.reason})
        if s.transient:
            result.failed += 1
            continue
        result.skipped += 1
        changes["rejected"][key] = {
            "etag": listing[key],
            "reason": s.reason,
            "rejected_at": batch.scored_at,
        }


#: Referred images queued for review at once.
QUEUE_CHUNK = 100


def _write_rows(
    client: Any,
    spool: Path,
    csv_path: Path,
    report: Any,
    listing: dict[str, str],
    outputs: Outputs,
    changes: dict[str, Any],
    result: ScoringResult,
) -> None:
    """The spooled predictions into the CSV and the ledger entries, each image of a drifted batch
    referred (`report.reason`), the referred ones queued for review a chunk at a time."""
    pending_referrals: list[Any] = []
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for key, sha, at, p in _spooled(spool):
            if report.reason:
                p = p.referred_for(report.reason)
            row = {k: v for k, v in p.as_row().items() if k != "image"}
            writer.writerow({"key": key, **row, "scored_at": at, "batch_drift": report.decision})
            changes["scored"][key] = scored_entry(listing[key], outputs.csv_key, at, p)
            if p.refer:
                pending_referrals.append(_referral(p, key, sha, outputs.bucket, at))
            if len(pending_referrals) >= QUEUE_CHUNK:
                _queue(client, outputs.bucket, pending_referrals, result)
    _queue(client, outputs.bucket, pending_referrals, result)


def _referral(p: Any, key: str, sha: str, bucket: str, scored_at: str) -> Any:
    """The review queue's item of one referred prediction."""
    from leukemia import review

    return review.Referral(
        sha256=sha,
        key=key,
        bucket=bucket,
        probabilities=dict(zip(CLASSES, p.probabilities, strict=True)),
        prediction_set=p.set_label,
        predicted=p.label,
        confidence=p.confidence,
        refer_reason=p.refer_reason,
        model_version=p.model_version,
        overlay_key=p.overlay,
        scored_at=scored_at,
    )


def _queue(client: Any, bucket: str, referrals: list[Any], result: ScoringResult) -> None:
    """Queue the referred images for review (`review.enqueue`: once per sha256); empties the list."""
    from leukemia import review

    result.referred += len(referrals)
    if referrals:
        result.queued += review.enqueue(client, bucket, referrals)
    referrals.clear()


def _upload_csv(client: Any, csv_path: Path, outputs: Outputs, result: ScoringResult) -> None:
    extra = {"ContentType": "text/csv"}
    client.upload_file(str(csv_path), outputs.bucket, outputs.csv_key, ExtraArgs=extra)
    result.predictions_uri = f"s3://{outputs.bucket}/{outputs.csv_key}"


def _upload_drift_report(client: Any, outputs: Outputs, result: ScoringResult) -> None:
    """The run's drift report as JSON beside its CSV."""
    import json

    body = json.dumps({"csv": outputs.csv_key, **result.drift}, indent=1).encode()
    client.put_object(
        Bucket=outputs.bucket, Key=outputs.drift_key, Body=body, ContentType="application/json"
    )
    result.drift_uri = f"s3://{outputs.bucket}/{outputs.drift_key}"


def _explainer(model: Any, tmp: Path) -> Any:
    from leukemia.gradcam import Explainer

    return Explainer(model.model, tmp / "gradcam")


def _upload_overlays(
    client: Any, explainer: Any, batch: Any, outputs: Outputs, explain: str
) -> list[Any]:
    """Explain the batch's referred images (`explain="all"`: every one), upload the overlays, and
    return the predictions with their overlay keys; local copies not needed for the sheet go."""
    chosen = [i for i, p in enumerate(batch.predictions) if explain == "all" or p.refer]
    if not chosen:
        return batch.predictions
    names = [batch.predictions[i].image for i in chosen]
    keys = {}
    for i, path in zip(chosen, explainer.add(batch.pixels[chosen], names), strict=True):
        keys[i] = f"{outputs.gradcam_prefix}{path.name}"
        client.upload_file(str(path), outputs.bucket, keys[i])
        if not explainer.in_sheet(path):
            path.unlink()  # local disk stays bounded too
    return [replace(p, overlay=keys.get(i, "")) for i, p in enumerate(batch.predictions)]


def _upload_contact_sheet(
    client: Any, explainer: Any, model_name: str, outputs: Outputs, result: ScoringResult
) -> None:
    sheet = explainer.finish(title=f"Grad-CAM, {model_name}")
    if sheet is not None:
        client.upload_file(str(sheet), outputs.bucket, f"{outputs.gradcam_prefix}{sheet.name}")
        result.gradcam_uri = f"s3://{outputs.bucket}/{outputs.gradcam_prefix}"


def _log_summary(result: ScoringResult, model_name: str) -> None:
    if not result.scored:
        log.warning(
            "None of the %d new images could be scored with %s (%d unreadable, %d failed "
            "downloads): no CSV written, nothing referred",
            result.skipped + result.failed,
            model_name,
            result.skipped,
            result.failed,
        )
    else:
        log.info(
            "Scored %d images with %s in %.1fs (%d skipped, %d failed downloads); %d referred, "
            "%d newly queued for review: %s",
            result.scored,
            model_name,
            result.seconds,
            result.skipped,
            result.failed,
            result.referred,
            result.queued,
            result.predictions_uri,
        )
        if result.drift:
            log.info("%s: %s", result.drift_uri, result.drift["line"])
    for item in result.skipped_keys[:20]:
        log.warning("Not scored %s: %s", item["key"], item["reason"])
