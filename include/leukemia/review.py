"""The review of referred images: a queue in the bucket, forms a person answers, labels that train.

Scoring queues each image it refers (`enqueue`); the `leukemia_review` DAG takes the oldest pending
ones into a form (`open_form`), a haematologist answers it in Airflow's Required Actions, and
`apply_labels` copies each labelled image into the raw-image prefix, where the next training finds
it. Everything lives under `LEUKEMIA_REVIEW_PREFIX` (default `review/`) of the bucket:

- `queue/<sha256>.json`: one pending image (a `Referral`), written once (put-if-absent), so two
  scorers queue an image once; removed when the image is done.
- `claims/<sha256>.json`: the form that shows the image (`form`, `expires_at`); a claim past its
  expiry belongs to a form that died and no longer holds the image. Removed when the form closes.
- `forms/<form>.json`: what one form asked (the referrals and their links) and, once closed, what
  became of each image.
- `done/<sha256>.json`: the answer (labelled, unusable or vanished), who gave it and when; an image
  with a done record is never queued or asked again.

A labelled image lands at `<LEUKEMIA_RAW_PREFIX><Class>/review-<sha12><ext>` (its original bytes,
never over an existing object) with its provenance beside it (`review-<sha12>.json`; the training
sync lists it as "not an image file name" and leaves it out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

from leukemia.config import CLASSES, env

log = logging.getLogger(__name__)

#: The answers besides a class: the image shows nothing a class can be read from; ask again later.
UNUSABLE = "unusable"
SKIP = "skip (ask again later)"
CHOICES: tuple[str, ...] = (*CLASSES, UNUSABLE, SKIP)
#: What became of an image once its form closed.
LABELLED, VANISHED, PENDING = "labelled", "vanished", "pending"
QUEUE, CLAIMS, FORMS, DONE = "queue/", "claims/", "forms/", "done/"
#: A claim outlives its form's response timeout by this much before another form may take the image.
CLAIM_GRACE = timedelta(hours=1)
#: S3 answers to a put-if-absent that lost: 412 the object exists, 409 a concurrent write is in flight.
LOST_RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
#: Longest life of a pre-signed S3 URL (signature version 4).
MAX_LINK_SECONDS = 7 * 24 * 3600
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Referral:
    """One image the model referred to a person, as scoring queues it."""

    sha256: str
    key: str  # the image's object key in `bucket`, e.g. incoming/x.png
    bucket: str
    probabilities: dict[str, float]
    prediction_set: str  # "Pre|Pro"
    predicted: str
    confidence: float
    refer_reason: str
    model_version: str
    overlay_key: str = ""  # the Grad-CAM overlay's key (or s3:// URI, or a path); "" when none
    scored_at: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Referral:
        """The referral in `data` (other keys, such as a form's links, are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class ReviewSettings:
    """The deployment's review settings (environment, `config.ENV_DEFAULTS`)."""

    batch: int  # LEUKEMIA_REVIEW_BATCH: most images one form asks about
    timeout_hours: float  # LEUKEMIA_REVIEW_TIMEOUT_HOURS: how long a form waits for its answer
    link_hours: float  # LEUKEMIA_REVIEW_LINK_HOURS: life of the form's pre-signed links

    @classmethod
    def from_env(cls) -> ReviewSettings:
        values = {
            "batch": int(env("LEUKEMIA_REVIEW_BATCH")),
            "timeout_hours": float(env("LEUKEMIA_REVIEW_TIMEOUT_HOURS")),
            "link_hours": float(env("LEUKEMIA_REVIEW_LINK_HOURS")),
        }
        if values["batch"] < 1 or values["timeout_hours"] <= 0 or values["link_hours"] <= 0:
            raise ValueError(
                f"review settings out of range: {values}; set LEUKEMIA_REVIEW_BATCH to 1 or more "
                "and LEUKEMIA_REVIEW_TIMEOUT_HOURS / LEUKEMIA_REVIEW_LINK_HOURS above 0"
            )
        return cls(**values)  # type: ignore[arg-type]


def prefix() -> str:
    """The review prefix of the bucket, ending in `/`."""
    return env("LEUKEMIA_REVIEW_PREFIX").strip("/") + "/"


def queue_key(sha256: str) -> str:
    return f"{prefix()}{QUEUE}{sha256}.json"


def claim_key(sha256: str) -> str:
    return f"{prefix()}{CLAIMS}{sha256}.json"


def done_key(sha256: str) -> str:
    return f"{prefix()}{DONE}{sha256}.json"


def form_key(form: str) -> str:
    """The form's manifest; `form` is the DAG run id (characters S3 keys dislike replaced)."""
    return f"{prefix()}{FORMS}{re.sub(r'[^A-Za-z0-9._-]', '_', form)}.json"


# --- S3 primitives --------------------------------------------------------------------------------


def _json(payload: Any) -> bytes:
    return json.dumps(payload, indent=1, sort_keys=True).encode()


def _lost_race(exc: Exception) -> bool:
    """True when a put-if-absent failed because the object exists (or is being written)."""
    from leukemia.ledger import conditional_write_lost

    return conditional_write_lost(exc, LOST_RACE_CODES)


def put_if_absent(
    client: Any, bucket: str, key: str, body: bytes, content_type: str = "application/json"
) -> bool:
    """Write the object only if there is none (`If-None-Match: *`); False when one was there."""
    try:
        client.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType=content_type, IfNoneMatch="*"
        )
    except Exception as exc:
        if _lost_race(exc):
            return False
        raise
    return True


def _missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
    return code in ("NoSuchKey", "404", "NotFound")


def exists(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if _missing(exc):
            return False
        raise
    return True


def read_bytes(client: Any, bucket: str, key: str) -> bytes | None:
    """The object's bytes; None when there is none."""
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:
        if _missing(exc):
            return None
        raise
    with body:
        return bytes(body.read())


def read_json(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    data = read_bytes(client, bucket, key)
    return None if data is None else json.loads(data)


def _listing(client: Any, bucket: str, folder: str) -> list[dict[str, Any]]:
    """The `<sha256>.json` objects of a review folder, oldest first (then by key)."""
    from leukemia.storage import list_objects

    base = prefix() + folder
    found = [
        o
        for o in list_objects(client, bucket, base)
        if _SHA256.fullmatch(o["Key"][len(base) :].removesuffix(".json"))
    ]
    return sorted(found, key=lambda o: (o["LastModified"], o["Key"]))


def _sha_of(obj: Mapping[str, Any]) -> str:
    return PurePosixPath(obj["Key"]).name.removesuffix(".json")


# --- the queue ------------------------------------------------------------------------------------


def enqueue(client: Any, bucket: str, referrals: Sequence[Referral]) -> int:
    """Queue each referred image once, by its sha256; the number newly queued.

    An image already queued, or already reviewed (a done record), is not queued again. The queue
    entry is written with a put-if-absent, so two scorers that refer the same image at once queue it
    once (the loser's write is refused by S3 and not counted).
    """
    new = 0
    seen: set[str] = set()
    for referral in referrals:
        if not _SHA256.fullmatch(referral.sha256):
            raise ValueError(
                f"referral of {referral.key} has sha256 {referral.sha256!r}: expected 64 lowercase "
                "hex digits (hashlib.sha256(image bytes).hexdigest())"
            )
        if referral.sha256 in seen or exists(client, bucket, done_key(referral.sha256)):
            continue
        seen.add(referral.sha256)
        entry = asdict(referral)  # numbers as plain floats: a model's may be numpy scalars
        entry["probabilities"] = {k: float(v) for k, v in referral.probabilities.items()}
        entry["confidence"] = float(referral.confidence)
        if put_if_absent(client, bucket, queue_key(referral.sha256), _json(entry)):
            new += 1
    log.info(
        "Queued %d of %d referred images for review in s3://%s/%s%s",
        new,
        len(referrals),
        bucket,
        prefix(),
        QUEUE,
    )
    return new


def pending(client: Any, bucket: str) -> list[str]:
    """The sha256 of every queued image without a done record, oldest first."""
    return [
        _sha_of(o)
        for o in _listing(client, bucket, QUEUE)
        if not exists(client, bucket, done_key(_sha_of(o)))
    ]


# --- forms ----------------------------------------------------------------------------------------


def _live_claim(claim: Mapping[str, Any] | None, form: str, now: datetime) -> bool:
    """True when another form holds the image: its claim is not ours and has not expired."""
    if claim is None or claim.get("form") == form:
        return False
    return datetime.fromisoformat(str(claim["expires_at"])) > now


def _claim(
    client: Any, bucket: str, sha256: str, form: str, now: datetime, expires: datetime
) -> bool:
    """Take the image for `form` (already ours on a retry); False when a live form holds it.

    A new claim is a put-if-absent; an expired one is replaced only if it is still the one read
    (`If-Match` its ETag), so two forms never both take an image.
    """
    key = claim_key(sha256)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        held, etag = json.loads(response["Body"].read()), str(response["ETag"])
    except Exception as exc:
        if not _missing(exc):
            raise
        held, etag = None, ""
    if held is not None and held.get("form") == form:
        return True
    if _live_claim(held, form, now):
        return False
    claim = _json({"form": form, "claimed_at": now.isoformat(), "expires_at": expires.isoformat()})
    if held is None:
        return put_if_absent(client, bucket, key, claim)
    log.info("Claim of %s by form %s expired at %s", sha256[:12], held["form"], held["expires_at"])
    try:  # its form died: the image is free again
        client.put_object(Bucket=bucket, Key=key, Body=claim, IfMatch=etag)
    except Exception as exc:
        if _lost_race(exc):
            return False
        raise
    return True


def link(client: Any, bucket: str, location: str, seconds: int) -> str:
    """A link a reviewer's browser can open: a pre-signed GET for an object (a key in `bucket` or an
    `s3://` URI), the path itself for a local file; "" for none."""
    if not location:
        return ""
    if location.startswith("file://") or location.startswith("/"):
        return location
    if location.startswith("s3://"):
        bucket, _, location = location.removeprefix("s3://").partition("/")
        bucket = bucket.rpartition("@")[2]  # s3://conn@bucket/key
    return str(
        client.generate_presigned_url(
            "get_object",
            Params={"Bucket": bucket, "Key": location},
            ExpiresIn=max(1, min(seconds, MAX_LINK_SECONDS)),
        )
    )


def open_form(
    client: Any, bucket: str, form: str, settings: ReviewSettings, now: datetime | None = None
) -> str:
    """Claim up to `settings.batch` pending images for `form` (oldest first; none that is reviewed or
    shown by another live form), write the form's manifest and return its key ("" when nothing is
    pending). A retry of the same form takes back the images it had claimed."""
    now = now or datetime.now(UTC)
    closes = now + timedelta(hours=settings.timeout_hours)
    expires = closes + CLAIM_GRACE
    seconds = int(settings.link_hours * 3600)
    images: list[dict[str, Any]] = []
    for obj in _listing(client, bucket, QUEUE):
        if len(images) >= settings.batch:
            break
        sha = _sha_of(obj)
        if exists(client, bucket, done_key(sha)):  # reviewed after it was queued again
            client.delete_object(Bucket=bucket, Key=obj["Key"])
            continue
        if not _claim(client, bucket, sha, form, now, expires):
            continue
        entry = read_json(client, bucket, obj["Key"])
        if entry is None:  # done and removed meanwhile
            client.delete_object(Bucket=bucket, Key=claim_key(sha))
            continue
        referral = Referral.from_dict(entry)
        images.append(
            {
                **asdict(referral),
                "param": sha[:12],
                "queued_at": obj["LastModified"].isoformat(),
                "image_url": link(client, referral.bucket, referral.key, seconds),
                "overlay_url": link(client, referral.bucket, referral.overlay_key, seconds),
            }
        )
    if not images:
        log.info("Nothing to review: no pending image in s3://%s/%s%s", bucket, prefix(), QUEUE)
        return ""
    key = form_key(form)
    manifest = {
        "form": form,
        "bucket": bucket,
        "status": "open",
        "opened_at": now.isoformat(),
        "closes_at": closes.isoformat(timespec="minutes"),
        "expires_at": expires.isoformat(),
        "images": images,
    }
    client.put_object(Bucket=bucket, Key=key, Body=_json(manifest), ContentType="application/json")
    log.info("Form %s asks about %d images (s3://%s/%s)", form, len(images), bucket, key)
    return key


def read_form(client: Any, bucket: str, key: str) -> dict[str, Any]:
    """The form's manifest; an error that says what to do when it is gone."""
    manifest = read_json(client, bucket, key)
    if manifest is None:
        raise FileNotFoundError(
            f"no review form at s3://{bucket}/{key}: it was deleted after the form opened. Its "
            "images return to the queue when their claims expire; trigger leukemia_review again"
        )
    return manifest


def describe(entry: Mapping[str, Any]) -> str:
    """What the reviewer reads about one image (markdown): probabilities, set, reason, links."""
    rows = "\n".join(
        f"| {name} | {float(p):.3f} |"
        for name, p in sorted(entry["probabilities"].items(), key=lambda item: -float(item[1]))
    )
    links = [f"[image]({entry['image_url']})"]
    if entry.get("overlay_url"):
        links.append(f"[Grad-CAM overlay]({entry['overlay_url']})")
    return (
        f"**{entry['key']}** (sha256 {entry['sha256'][:12]}), model v{entry['model_version']}: "
        f"**{entry['predicted']}** ({float(entry['confidence']):.1%}), prediction set "
        f"**{entry['prediction_set']}**. Referred because: {entry['refer_reason']}.\n\n"
        f"| class | probability |\n|---|---|\n{rows}\n\n{' · '.join(links)}"
    )


def field_title(n: int, entry: Mapping[str, Any]) -> str:
    """The title of image `n`'s field in the form, and of its section in the form's body."""
    return f"{n}. {entry['key'].rsplit('/', 1)[-1]}"


def form_body(manifest: Mapping[str, Any]) -> str:
    """The form's body (markdown): how to answer, then one section per image (`describe`) under
    its field's title. Airflow's form shows a field's plain `description` only, not its markdown,
    so the probabilities and the links to the image and its overlay are here."""
    n = len(manifest["images"])
    intro = (
        f"The classifier was unsure about {n} image{'s' if n != 1 else ''}. For each, choose the "
        f"class you see ({', '.join(CLASSES)}), **{UNUSABLE}** when no class can be read from it, "
        f"or **{SKIP}** to leave it for a later form. Each class you give becomes a training "
        "image, recorded with your name; unanswered images come back in the next form. Open the "
        f"links to see each image and where the model looked. Form closes {manifest['closes_at']}."
    )
    sections = [
        f"### {field_title(i, entry)}\n\n{describe(entry)}"
        for i, entry in enumerate(manifest["images"], start=1)
    ]
    return "\n\n".join([intro, *sections])


def read_answers(
    manifest: Mapping[str, Any], params_input: Mapping[str, Any]
) -> tuple[dict[str, str], dict[str, str]]:
    """(sha256 → choice, sha256 → why refused) from a form's answer. An answer that is not one of
    `CHOICES` is refused (its image stays pending); an unanswered image is skipped."""
    answers: dict[str, str] = {}
    refused: dict[str, str] = {}
    for entry in manifest["images"]:
        value = params_input.get(entry["param"], SKIP)
        if isinstance(value, str) and value in CHOICES:
            answers[entry["sha256"]] = value
        else:
            refused[entry["sha256"]] = (
                f"answer {value!r} for {entry['key']} is not one of {', '.join(CHOICES)}: the "
                "image stays pending and comes back in the next form"
            )
    unknown = set(params_input) - {e["param"] for e in manifest["images"]}
    if unknown:
        log.warning(
            "Ignored answers to fields the form did not ask: %s", ", ".join(sorted(unknown))
        )
    return answers, refused


# --- labels ---------------------------------------------------------------------------------------


def raw_key(label: str, entry: Mapping[str, Any], raw_prefix: str) -> str:
    """Where a labelled image lands: `<raw prefix><Class>/review-<sha12><ext of the source>`."""
    suffix = PurePosixPath(entry["key"]).suffix.lower() or ".png"
    return f"{raw_prefix.strip('/')}/{label}/review-{entry['sha256'][:12]}{suffix}"


def _record(entry: Mapping[str, Any], answer: Mapping[str, Any], outcome: str) -> dict[str, Any]:
    """The provenance of an answer: who, when, in which form, and what the model had said."""
    return {
        "sha256": entry["sha256"],
        "outcome": outcome,
        "label": "",
        "reviewer": answer.get("reviewer") or "",
        "reviewer_id": answer.get("reviewer_id") or "",
        "reviewed_at": answer.get("responded_at") or "",
        "form": answer["form"],
        "source": f"s3://{entry['bucket']}/{entry['key']}",
        "model_version": entry["model_version"],
        "predicted": entry["predicted"],
        "prediction_set": entry["prediction_set"],
        "probabilities": entry["probabilities"],
        "confidence": entry["confidence"],
        "refer_reason": entry["refer_reason"],
    }


def _land(client: Any, bucket: str, entry: Mapping[str, Any], record: dict[str, Any]) -> str:
    """Copy the labelled image into the raw prefix with its provenance; "" when it landed, else why
    not (the source is gone or no longer the image that was referred)."""
    data = read_bytes(client, entry["bucket"], entry["key"])
    if data is None:
        return f"s3://{entry['bucket']}/{entry['key']} is gone"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return (
            f"s3://{entry['bucket']}/{entry['key']} now holds other bytes than the image referred"
        )
    key = raw_key(record["label"], entry, env("LEUKEMIA_RAW_PREFIX"))
    content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    if not put_if_absent(client, bucket, key, data, content_type):
        log.info("s3://%s/%s is already there (an earlier try of this form)", bucket, key)
    record["raw_key"] = key
    put_if_absent(client, bucket, key.rsplit(".", 1)[0] + ".json", _json(record))
    return ""


def _settle(
    client: Any, bucket: str, entry: Mapping[str, Any], answer: Mapping[str, Any]
) -> tuple[str, str]:
    """Apply one image's answer: (outcome, raw key or reason). Skipped and refused ones stay
    pending; the others get a done record and leave the queue."""
    sha = entry["sha256"]
    previous = read_json(client, bucket, done_key(sha))
    if previous is not None:  # an earlier try of this task settled it
        client.delete_object(Bucket=bucket, Key=queue_key(sha))
        return previous["outcome"], previous.get("raw_key") or previous.get("reason", "")
    choice = answer["answers"].get(sha, SKIP)
    if sha in answer.get("refused", {}) or choice == SKIP:
        return PENDING, answer.get("refused", {}).get(sha, "skipped")
    record = _record(entry, answer, LABELLED if choice in CLASSES else UNUSABLE)
    detail = ""
    if choice in CLASSES:
        record["label"] = choice
        reason = _land(client, bucket, entry, record)
        if reason:
            log.warning(
                "Refused the label %s of %s: %s; marked done as vanished", choice, sha[:12], reason
            )
            record.update(outcome=VANISHED, reason=reason)
        detail = record.get("raw_key", reason)
    put_if_absent(client, bucket, done_key(sha), _json(record))
    client.delete_object(Bucket=bucket, Key=queue_key(sha))
    return record["outcome"], detail


def apply_labels(client: Any, bucket: str, answer: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a form's answer (`answer`: the review task's result) and close the form.

    Labelled images land in the raw prefix; unusable and vanished ones are recorded as done with no
    image written; skipped, refused and unanswered (timed-out) ones stay pending. Every claim of the
    form is released, so pending images come back in the next form. Returns the counts per outcome
    and the keys of the images that landed.
    """
    manifest = read_form(client, bucket, answer["form"])
    outcomes: dict[str, dict[str, str]] = {}
    landed: list[str] = []
    for entry in manifest["images"]:
        outcome, detail = _settle(client, bucket, entry, answer)
        outcomes[entry["sha256"]] = {"outcome": outcome, "detail": detail}
        if outcome == LABELLED:
            landed.append(detail)
        client.delete_object(Bucket=bucket, Key=claim_key(entry["sha256"]))
    manifest.update(
        status="closed",
        closed_at=datetime.now(UTC).isoformat(),
        reviewer=answer.get("reviewer") or "",
        timed_out=bool(answer.get("timedout")),
        outcomes=outcomes,
    )
    client.put_object(
        Bucket=bucket, Key=answer["form"], Body=_json(manifest), ContentType="application/json"
    )
    counts = {
        o: sum(v["outcome"] == o for v in outcomes.values())
        for o in (LABELLED, UNUSABLE, VANISHED, PENDING)
    }
    log.info(
        "Form %s answered by %s: %s; new training images: %s",
        manifest["form"],
        answer.get("reviewer") or "nobody (timed out)",
        ", ".join(f"{n} {o}" for o, n in counts.items()),
        ", ".join(landed) or "none",
    )
    return {"form": answer["form"], **counts, "raw_keys": landed}
