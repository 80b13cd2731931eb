"""S3 storage: incremental, concurrent, atomic sync of `<prefix>/<Class>/<image>` objects, and upload.

Built on the Amazon provider's `S3Hook` so the Airflow connection (`aws_default` by default) decides the
credentials and the endpoint. S3 is only ever read by the sync: bad objects are reported, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from leukemia.config import CLASSES, StorageConfig
from leukemia.images import (
    IMAGE_SUFFIXES,
    ImageRejected,
    class_of_folder,
    is_image_name,
    iter_image_files,
    validate_image,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "sync_manifest.json"
REPORT_NAME = "sync_report.json"
PROGRESS_EVERY = 200


@dataclass
class SyncResult:
    """What one sync did; `digest` identifies the local image set."""

    listed: int = 0
    downloaded: int = 0
    stored: int = 0
    unchanged: int = 0
    deleted: int = 0
    images: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    digest: str = ""
    manifest_path: str = ""
    report_path: str = ""
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Small dict for XCom and logs (no per-key lists)."""
        out = asdict(self)
        out["skipped"] = len(self.skipped)
        out["failed"] = len(self.failed)
        return out


def s3_client(conn_id: str, workers: int = 16, max_attempts: int = 8) -> Any:
    """A boto3 S3 client from the Airflow connection, with retries and a pool sized for `workers`.

    botocore's `standard` retry mode retries throttling and 5xx answers with exponential backoff
    and jitter; the pool must be at least as large as the thread count.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.config import Config

    hook = S3Hook(aws_conn_id=conn_id)
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max(10, workers),
    )
    return hook.get_client_type(config=config)


def classify_key(key: str, prefix: str) -> tuple[str, str] | str:
    """Map an S3 key to (class, file name), or return the reason it cannot be used."""
    rel = key[len(prefix) :] if key.startswith(prefix) else key
    if "\\" in rel or rel.startswith("/") or "\x00" in rel:
        return "unsafe key: would escape the target folder"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "unsafe key: would escape the target folder"
    if len(parts) == 1:
        return "outside a class folder: expected <prefix>/<Benign|Early|Pre|Pro>/<name>"
    if len(parts) > 2:
        return "nested folder: expected <prefix>/<Benign|Early|Pre|Pro>/<name>"
    label = class_of_folder(parts[0])
    if label is None:
        return f"unknown class folder {parts[0]!r}: expected one of {', '.join(CLASSES)}"
    if not is_image_name(parts[1]):
        return f"not an image file name (expected one of {', '.join(IMAGE_SUFFIXES)})"
    return label, parts[1]


def dataset_digest(entries: Iterable[tuple[str, str]]) -> str:
    """Hash of the sorted (class, sha256) list: changes exactly when the image set changes."""
    h = hashlib.sha256()
    for label, sha in sorted(entries):
        h.update(f"{label}\t{sha}\n".encode())
    return h.hexdigest()


def _identity(obj: dict[str, Any]) -> dict[str, Any]:
    """The listing fields that tell whether an object changed (ETag alone is not an MD5)."""
    modified = obj["LastModified"]
    if isinstance(modified, datetime):
        modified = modified.astimezone(UTC).isoformat()
    return {
        "size": int(obj["Size"]),
        "etag": str(obj["ETag"]).strip('"'),
        "last_modified": modified,
    }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, payload: Any, indent: int | None = 1) -> None:
    _atomic_write_bytes(path, json.dumps(payload, indent=indent, sort_keys=True).encode())


def _move_aside(src: Path, root: Path, folder: str, rel: str) -> Path | None:
    """Move a local file under root/folder/<timestamp>/rel, so nothing is ever lost."""
    if not src.exists():
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    dest, n = root / folder / stamp / rel, 1
    while dest.exists():  # the same file moved aside twice within a second: keep both
        n += 1
        dest = root / folder / f"{stamp}-{n}" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), dest)
    return dest


def _with_backoff(fn: Callable[[], bytes], attempts: int, base: float = 0.2) -> bytes:
    """Call `fn`, retrying transport errors botocore itself does not retry (e.g. cut bodies)."""
    from botocore.exceptions import BotoCoreError, ClientError

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            retryable = status >= 500 or status == 429 or "Throttl" in code or code == "SlowDown"
            if not retryable or attempt == attempts:
                raise
        except (BotoCoreError, ConnectionError) as exc:
            if attempt == attempts:
                raise
            log.debug("Retrying after %s", exc)
        time.sleep(base * 2 ** (attempt - 1) * (0.5 + random.random()))
    raise AssertionError("unreachable")


@contextmanager
def _cancel_on_interrupt(pool: ThreadPoolExecutor) -> Iterator[None]:
    """On Ctrl-C or a task kill, drop the queued downloads rather than finish them all first."""
    try:
        yield
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def list_objects(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every object under `prefix`, page by page (1,000 keys a page)."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def load_manifest(local_dir: Path) -> dict[str, Any]:
    """The sync manifest of `local_dir` (empty when there is none yet)."""
    path = Path(local_dir) / MANIFEST_NAME
    if not path.exists():
        return {"images": {}, "rejected": {}}
    return json.loads(path.read_text())


def sync_images(
    cfg: StorageConfig,
    client: Any | None = None,
    workers: int = 16,
    attempts: int = 4,
    checkpoint_every: int = 100,
) -> SyncResult:
    """Bring `cfg.local_dir` in line with `s3://bucket/prefix`: new and changed objects only.

    Images land atomically under `<local_dir>/<Class>/<name>`; rejects go to `quarantine/`, local
    copies of deleted or replaced objects to `trash/`. The manifest is checkpointed while downloading,
    so a sync killed at any point resumes where it stopped.
    """
    started = time.monotonic()
    root = Path(cfg.local_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.rglob(".*.part"):  # temporary files of a sync killed mid-write
        stale.unlink(missing_ok=True)
    prefix = cfg.prefix if not cfg.prefix or cfg.prefix.endswith("/") else cfg.prefix + "/"
    client = client or s3_client(cfg.conn_id, workers=workers)
    manifest = load_manifest(root)
    images: dict[str, Any] = manifest["images"]
    rejected: dict[str, Any] = manifest["rejected"]
    result = SyncResult()

    try:
        listing = {o["Key"]: o for o in list_objects(client, cfg.bucket, prefix)}
    except Exception as exc:
        raise RuntimeError(
            f"cannot list s3://{cfg.bucket}/{prefix} through connection {cfg.conn_id!r}: {exc}. "
            "Check that the bucket exists and the connection's credentials and endpoint_url."
        ) from exc
    result.listed = len(listing)

    # Objects gone from S3: forget them, keep their local copies in trash/.
    for key in [k for k in images if k not in listing]:
        entry = images.pop(key)
        _move_aside(root / entry["path"], root, "trash", entry["path"])
        result.deleted += 1
        log.info("Object %s was deleted from S3; local copy moved to trash/", key)
    for key in [k for k in rejected if k not in listing]:
        rejected.pop(key)

    owners = {e["path"]: k for k, e in images.items()}
    todo: list[tuple[str, str, dict[str, Any]]] = []
    for key, obj in sorted(listing.items()):
        if key.endswith("/") and int(obj["Size"]) == 0:
            continue  # a "folder" marker made by consoles
        ident = _identity(obj)
        if key in images and all(images[key][k] == v for k, v in ident.items()):
            result.unchanged += 1
            continue
        if key in rejected and all(rejected[key][k] == v for k, v in ident.items()):
            result.skipped.append({"key": key, "reason": rejected[key]["reason"]})
            continue
        where = classify_key(key, prefix)
        if isinstance(where, str):
            rejected[key] = {**ident, "reason": where}
            result.skipped.append({"key": key, "reason": where})
            continue
        if ident["size"] == 0:
            rejected[key] = {**ident, "reason": "empty object (0 bytes)"}
            result.skipped.append({"key": key, "reason": "empty object (0 bytes)"})
            continue
        rel = f"{where[0]}/{where[1]}"
        if owners.get(rel, key) != key:
            reason = f"another key ({owners[rel]}) already maps to the local file {rel}"
            result.skipped.append({"key": key, "reason": reason})
            continue
        owners[rel] = key
        todo.append((key, rel, ident))

    done = 0

    def fetch(key: str, rel: str) -> tuple[str, str]:
        """Download, check and store one object in a worker thread: (outcome, sha256 or reason).

        Decoding and fsync'd writes run here, beside the downloads, rather than one at a time
        in the thread that collects results.
        """

        def get() -> bytes:
            response = client.get_object(Bucket=cfg.bucket, Key=key)
            return response["Body"].read()

        try:
            data = _with_backoff(get, attempts)
        except Exception as exc:  # one object failing must not stop the others
            return "failed", f"download failed: {exc}"
        old = images.get(key)
        try:
            validate_image(data)
        except ImageRejected as exc:
            _atomic_write_bytes(root / "quarantine" / rel, data)
            if old is not None:  # the object was replaced by a bad version
                _move_aside(root / old["path"], root, "trash", old["path"])
            return "rejected", str(exc)
        if old is not None and (root / old["path"]).exists():
            _move_aside(root / old["path"], root, "trash", old["path"])
        _atomic_write_bytes(root / rel, data)
        return "stored", hashlib.sha256(data).hexdigest()

    log.info(
        "Syncing s3://%s/%s: %d listed, %d unchanged, %d to download",
        cfg.bucket,
        prefix,
        result.listed,
        result.unchanged,
        len(todo),
    )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, _cancel_on_interrupt(pool):
        futures = {pool.submit(fetch, key, rel): (key, rel, ident) for key, rel, ident in todo}
        for future in as_completed(futures):
            key, rel, ident = futures[future]
            outcome, detail = future.result()
            if outcome == "failed":
                result.failed.append({"key": key, "reason": detail})
                log.warning("Download of %s failed, will retry next sync: %s", key, detail)
                continue
            result.downloaded += 1
            if outcome == "rejected":
                images.pop(key, None)
                rejected[key] = {**ident, "reason": detail}
                result.skipped.append({"key": key, "reason": detail})
                log.warning("Quarantined %s: %s", key, detail)
            else:
                rejected.pop(key, None)
                result.stored += 1
                images[key] = {**ident, "path": rel, "label": rel.split("/")[0], "sha256": detail}
            done += 1
            if done % checkpoint_every == 0:  # compact: indented JSON has no C encoder
                _atomic_write_json(root / MANIFEST_NAME, manifest, indent=None)
            if done % PROGRESS_EVERY == 0:
                log.info("Downloaded %d/%d objects", done, len(todo))

    result.images = len(images)
    result.digest = dataset_digest((e["label"], e["sha256"]) for e in images.values())
    manifest["digest"] = result.digest
    manifest["bucket"], manifest["prefix"] = cfg.bucket, prefix
    _atomic_write_json(root / MANIFEST_NAME, manifest)
    result.seconds = round(time.monotonic() - started, 3)
    result.manifest_path = str(root / MANIFEST_NAME)
    result.report_path = str(root / REPORT_NAME)
    _atomic_write_json(root / REPORT_NAME, asdict(result))
    log.info(
        "Sync done in %.1fs: %d images (%d new or changed, %d unchanged, %d deleted), %d skipped, "
        "%d failed; dataset digest %s",
        result.seconds,
        result.images,
        result.stored,
        result.unchanged,
        result.deleted,
        len(result.skipped),
        len(result.failed),
        result.digest[:12],
    )
    return result


def upload_folder(
    source: str | Path,
    bucket: str,
    prefix: str = "raw/",
    conn_id: str = "aws_default",
    workers: int = 16,
    create_bucket: bool = True,
) -> int:
    """Upload a `<Class>/<name>` folder (synthetic or the public data set) to `s3://bucket/prefix`."""
    source = Path(source)
    files = list(iter_image_files(source))
    if not files:
        raise ValueError(
            f"no images under {source}: expected {source}/<Benign|Early|Pre|Pro>/<name>.jpg"
        )
    client = s3_client(conn_id, workers=workers)
    if create_bucket:
        try:
            client.head_bucket(Bucket=bucket)
        except Exception:
            client.create_bucket(Bucket=bucket)
            log.info("Created bucket %s", bucket)
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"

    def put(item: tuple[str, Path]) -> None:
        label, path = item
        key = str(PurePosixPath(prefix) / label / path.name) if prefix else f"{label}/{path.name}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, _ in enumerate(pool.map(put, files), 1):
            if i % PROGRESS_EVERY == 0:
                log.info("Uploaded %d/%d images", i, len(files))
    log.info("Uploaded %d images from %s to s3://%s/%s", len(files), source, bucket, prefix)
    return len(files)
