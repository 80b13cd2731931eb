"""Batch scoring: classify the images under `s3://<bucket>/incoming/` that this model version has
not scored yet, and write the predictions as a CSV next to them.

Layout in the bucket (one model version = one folder; nothing is ever deleted or rewritten except
the ledger):

    incoming/<any>/<name>.jpg                    images to score (any depth, image suffixes)
    predictions/v<version>/<timestamp>.csv       one CSV per run that scored something
    predictions/v<version>/<timestamp>-gradcam/  Grad-CAM overlays and contact sheet (when asked)
    predictions/ledger/v<version>.json           what that version has scored: key → ETag

The ledger makes runs incremental: an object is scored when its key is not in the version's
ledger or its ETag changed (the image was replaced). Images that cannot be decoded are recorded too,
with the reason, so they are not retried every run until they are replaced; failed downloads are
not recorded and are retried next run. The CSV is uploaded before the ledger, so a run killed in
between scores those images again next time: predictions are at-least-once, and a consumer keeps
the latest `scored_at` per (key, model_version). A new champion has an empty ledger, so it
re-scores everything under the prefix.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES, scoring_mlflow_login

log = logging.getLogger(__name__)

PREDICTIONS_PREFIX = "predictions/"
LEDGER_FOLDER = "ledger"
CSV_COLUMNS = ("key", "class", *CLASSES, "malignant", "model_version", "scored_at")
PROGRESS_EVERY = 500


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
    predictions_uri: str = ""
    gradcam_uri: str = ""
    ledger_uri: str = ""
    seconds: float = 0.0
    skipped_keys: list[dict[str, str]] = field(default_factory=list)


def version_folder(model_version: str) -> str:
    """`v3` for a registry version; a URI (no registry version) becomes a safe folder name."""
    if model_version.isdigit():
        return f"v{model_version}"
    import hashlib

    return "uri-" + hashlib.sha256(model_version.encode()).hexdigest()[:12]


def ledger_key(model_version: str, predictions_prefix: str = PREDICTIONS_PREFIX) -> str:
    return f"{predictions_prefix}{LEDGER_FOLDER}/{version_folder(model_version)}.json"


def read_ledger(client: Any, bucket: str, key: str) -> dict[str, Any]:
    """The ledger object, or an empty one when this version has scored nothing yet."""
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return {"scored": {}, "rejected": {}}
    ledger = json.loads(body)
    ledger.setdefault("scored", {})
    ledger.setdefault("rejected", {})
    return ledger


def pending(listing: dict[str, str], ledger: dict[str, Any]) -> list[str]:
    """Keys (sorted) whose current ETag this version has neither scored nor rejected."""
    seen = {k: v["etag"] for k, v in ledger["rejected"].items()}
    seen.update({k: v["etag"] for k, v in ledger["scored"].items()})
    return sorted(k for k, etag in listing.items() if seen.get(k) != etag)


def list_images(client: Any, bucket: str, prefix: str) -> dict[str, str]:
    """key → ETag of every image object under `prefix`."""
    from leukemia.images import is_image_name
    from leukemia.storage import list_objects

    return {
        o["Key"]: str(o["ETag"]).strip('"')
        for o in list_objects(client, bucket, prefix)
        if is_image_name(o["Key"]) and int(o.get("Size", 1)) > 0
    }


def score_incoming(
    bucket: str,
    prefix: str = "incoming/",
    conn_id: str = "aws_default",
    model_uri: str | None = None,
    batch_size: int = 32,
    explain: bool = False,
    predictions_prefix: str = PREDICTIONS_PREFIX,
    client: Any | None = None,
) -> ScoringResult:
    """Score the images under `s3://bucket/prefix` that this model version has not scored yet.

    Streams `batch_size` images at a time; the CSV rows go to a local temporary file, so memory
    stays bounded however many images are pending.
    """
    from leukemia import predict
    from leukemia.storage import s3_client

    started = time.monotonic()
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    client = client or s3_client(conn_id)
    model = predict.load_model(model_uri)
    version = model.version
    folder = f"{predictions_prefix}{version_folder(version)}"
    result = ScoringResult(model_uri=model.ref.pinned_uri, model_version=version)
    ledger_at = ledger_key(version, predictions_prefix)
    result.ledger_uri = f"s3://{bucket}/{ledger_at}"
    try:
        listing = list_images(client, bucket, prefix)
    except Exception as exc:
        raise RuntimeError(
            f"cannot list s3://{bucket}/{prefix} through connection {conn_id!r}: {exc}. Check that the "
            "bucket exists and the connection's credentials and endpoint_url"
        ) from exc
    ledger = read_ledger(client, bucket, ledger_at)
    todo = pending(listing, ledger)
    result.listed, result.already_scored = len(listing), len(listing) - len(todo)
    log.info(
        "s3://%s/%s: %d images, %d already scored by %s, %d to score",
        bucket,
        prefix,
        len(listing),
        result.already_scored,
        model.ref.describe(),
        len(todo),
    )
    if not todo:
        result.seconds = round(time.monotonic() - started, 3)
        return result

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{uuid.uuid4().hex[:6]}"
    csv_key = f"{folder}/{stamp}.csv"
    sources = [predict.s3_source(client, bucket, k) for k in todo]
    key_of = {s.name: k for s, k in zip(sources, todo, strict=True)}
    scored: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="leukemia-scoring-") as tmp:
        explainer = None
        if explain:
            from leukemia.gradcam import Explainer

            explainer = Explainer(model.model, Path(tmp) / "gradcam")
        csv_path = Path(tmp) / "predictions.csv"
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for batch in predict.iter_batches(model, sources, batch_size):
                for p in batch.predictions:
                    key = key_of[p.image]
                    row = {k: v for k, v in p.as_row().items() if k != "image"}
                    writer.writerow({"key": key, **row, "scored_at": batch.scored_at})
                    scored[key] = {"etag": listing[key], "csv": csv_key}
                for s in batch.skipped:
                    key = key_of[s.image]
                    result.skipped_keys.append({"key": key, "reason": s.reason})
                    if s.transient:
                        result.failed += 1
                    else:
                        result.skipped += 1
                        ledger["rejected"][key] = {"etag": listing[key], "reason": s.reason}
                if explainer is not None:
                    for path in explainer.add(batch.pixels, [p.image for p in batch.predictions]):
                        client.upload_file(
                            str(path), bucket, f"{folder}/{stamp}-gradcam/{path.name}"
                        )
                        if not explainer.in_sheet(path):
                            path.unlink()  # local disk stays bounded too
                n = len(scored) + result.skipped + result.failed
                if n % PROGRESS_EVERY < batch_size:
                    log.info("Scored %d/%d images", n, len(todo))
        if scored:
            client.upload_file(
                str(csv_path), bucket, csv_key, ExtraArgs={"ContentType": "text/csv"}
            )
            result.predictions_uri = f"s3://{bucket}/{csv_key}"
        if explainer is not None:
            sheet = explainer.finish(title=f"Grad-CAM, {model.ref.describe()}")
            if sheet is not None:
                client.upload_file(str(sheet), bucket, f"{folder}/{stamp}-gradcam/{sheet.name}")
                result.gradcam_uri = f"s3://{bucket}/{folder}/{stamp}-gradcam/"
    result.scored = len(scored)
    for key in scored:
        ledger["rejected"].pop(key, None)
    ledger["scored"].update(scored)
    ledger.update(
        model_uri=model.ref.pinned_uri,
        model_version=version,
        updated_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    client.put_object(
        Bucket=bucket,
        Key=ledger_at,
        Body=json.dumps(ledger, indent=1, sort_keys=True).encode(),
        ContentType="application/json",
    )
    result.seconds = round(time.monotonic() - started, 3)
    log.info(
        "Scored %d images with %s in %.1fs (%d skipped, %d failed downloads): %s",
        result.scored,
        model.ref.describe(),
        result.seconds,
        result.skipped,
        result.failed,
        result.predictions_uri or "no CSV",
    )
    for item in result.skipped_keys[:20]:
        log.warning("Not scored %s: %s", item["key"], item["reason"])
    return result


def run(params: dict[str, Any], model_uri: str | None = None) -> dict[str, Any]:
    """The scoring DAG's task: Params in, a small summary out (at most 20 skipped keys listed).

    Talks to MLflow as the read-only scoring user where one is configured.
    """
    with scoring_mlflow_login():
        result = score_incoming(
            bucket=str(params["bucket"]),
            prefix=str(params["incoming_prefix"]),
            conn_id=str(params["conn_id"]),
            model_uri=model_uri,
            batch_size=int(params.get("batch_size", 32)),
            explain=bool(params.get("explain", False)),
        )
    out = asdict(result)
    out["skipped_keys"] = out["skipped_keys"][:20]
    return out


def champion_or_none(model_uri: str | None = None) -> dict[str, str] | None:
    """The model to score with, pinned to one version; None when no champion exists yet (the
    scoring DAG then skips: the champion asset triggers it again once training promotes one)."""
    from leukemia import registry

    try:
        with scoring_mlflow_login():
            ref = registry.resolve_model(model_uri or None)
    except registry.NoChampionError as exc:
        if model_uri:
            raise
        log.warning("Nothing to score with: %s", exc)
        return None
    return asdict(ref)
