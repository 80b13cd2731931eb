"""S3 storage: incremental, concurrent, atomic sync of `<prefix>/<Class>/<image>` objects, and upload.

Built on the Amazon provider's `S3Hook` so the Airflow connection (`aws_default` by default) decides the
credentials and the endpoint. S3 is only ever read by the sync: bad objects are reported, never deleted.
One object never stops a sync (its failure is recorded and the others land), one sync at a time
writes to a folder, and the class folders hold exactly the images the manifest records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from leukemia.config import CLASSES, StorageConfig
from leukemia.errors import first_line
from leukemia.images import (
    IMAGE_SUFFIXES,
    ImageLimits,
    ImageRejected,
    class_of_folder,
    is_image_name,
    iter_image_files,
    validate_image,
)
from leukemia.manifest_store import MANIFEST_NAME, STATE_NAME, ManifestStore
from leukemia.objectstore import s3_client

log = logging.getLogger(__name__)

REPORT_NAME = "sync_report.json"
#: Held (flock) by the sync writing to a folder; holds the pid and host of that sync.
LOCK_NAME = ".sync.lock"
PROGRESS_EVERY = 200
#: Longest local file name (UTF-8 bytes) a key may map to: file systems allow 255, and the name must
#: also fit in `quarantine/` and `trash/` on any of them.
MAX_NAME_BYTES = 200
FOLDER_MARKER = "folder marker (0-byte key ending in /)"


class SyncLocked(RuntimeError):
    """Another sync is writing to the same local folder."""


class SyncIncomplete(RuntimeError):
    """More objects failed to sync than allowed: the local image set is partial."""


@dataclass
class SyncResult:
    """What one sync did; `digest` identifies the local image set.

    `skipped` names every listed key that is not in the data set, with the reason: objects that were
    never stored (not images, too large, quarantined, folder markers) and images that are stored and
    counted in `images` but that the split leaves out (label conflicts, see `LabelConflict`).
    """

    listed: int = 0
    downloaded: int = 0
    stored: int = 0
    unchanged: int = 0
    deleted: int = 0
    reconciled: int = 0
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

    def require_complete(self, max_failed_fraction: float = 0.0) -> None:
        """Raise SyncIncomplete when failed objects are over `max_failed_fraction` of those listed.

        Failed means a download or disk error, worth a retry; skipped objects (not images, too
        large, quarantined) never belong in the data set and do not count.
        """
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(
                f"max_failed_fraction must be between 0 and 1, got {max_failed_fraction}"
            )
        if not self.failed:
            return
        share = len(self.failed) / max(self.listed, 1)
        if share <= max_failed_fraction:
            log.warning(
                "%d objects failed to sync, within the %.1f%% allowed",
                len(self.failed),
                100 * max_failed_fraction,
            )
            return
        first = self.failed[0]
        raise SyncIncomplete(
            f"{len(self.failed)} of {self.listed} objects failed ({share:.1%}, more than the "
            f"{max_failed_fraction:.1%} allowed), so the local image set is partial; first "
            f"{first['key']}: {first['reason']}. Every reason is in {self.report_path}: fix the "
            "cause and sync again, or allow that share of failures with max_failed_fraction"
        )


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
    if (n := len(parts[1].encode("utf-8", "surrogatepass"))) > MAX_NAME_BYTES:
        return f"file name too long: {n} bytes, at most {MAX_NAME_BYTES} bytes; rename the object"
    return label, parts[1]


@dataclass(frozen=True)
class LabelConflict:
    """Identical content under more than one class. Every copy is left out of the data set (the
    split drops them, the sync reports them): which copies are right is for a person to decide."""

    sha256: str
    copies: dict[str, list[str]]  # class -> the names (keys or paths) of its copies, sorted

    @property
    def majority(self) -> str | None:
        """The class that holds the most copies, or None when two or more classes tie."""
        most = max(len(names) for names in self.copies.values())
        top = [label for label, names in self.copies.items() if len(names) == most]
        return top[0] if len(top) == 1 else None

    @property
    def reason(self) -> str:
        """One line for the sync report: the classes, the majority (or the tie), what happens."""
        counts = {label: len(names) for label, names in self.copies.items()}
        under = ", ".join(f"{label} x{n}" for label, n in counts.items())
        total, most = sum(counts.values()), max(counts.values())
        if (majority := self.majority) is not None:
            verdict = f"majority {majority} ({most} of {total} copies)"
        else:
            tied = " and ".join(label for label, n in counts.items() if n == most)
            verdict = f"a tie between {tied} ({most} copies each)"
        return (
            f"label conflict: identical content (sha256 {self.sha256[:12]}) under {under}; "
            f"{verdict}; every copy is left out of the data set: delete or move the wrong copies"
        )


def label_conflicts(entries: Iterable[tuple[str, str, str]]) -> list[LabelConflict]:
    """The contents found under more than one class, from (name, class, sha256) entries."""
    by_sha: dict[str, dict[str, list[str]]] = {}
    for name, label, sha in entries:
        by_sha.setdefault(sha, {}).setdefault(label, []).append(name)
    return [
        LabelConflict(sha, {label: sorted(copies[label]) for label in sorted(copies)})
        for sha, copies in sorted(by_sha.items())
        if len(copies) > 1
    ]


def dataset_digest(entries: Iterable[tuple[str, str]]) -> str:
    """Hash of the sorted (class, sha256) list: changes exactly when the image set changes."""
    return _digest_of_sorted(sorted(entries))


def _digest_of_sorted(entries: Iterable[tuple[str, str]]) -> str:
    """`dataset_digest` of entries already sorted (streamed from the manifest store)."""
    h = hashlib.sha256()
    for label, sha in entries:
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


def _write_temp(path: Path, chunks: Iterable[bytes]) -> Path:
    """Write `chunks` to a fsync'd temporary file beside `path` (a short name, whatever `path` is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.part")
    try:
        with open(tmp, "wb", buffering=1 << 16) as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    tmp = _write_temp(path, chunks)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, (data,))


def _atomic_write_json(path: Path, payload: Any) -> None:
    _atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True).encode())


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
def _folder_lock(root: Path, wait_s: float) -> Iterator[None]:
    """Hold the folder's lock for one sync, waiting up to `wait_s` seconds for another sync to end.

    An flock: the kernel drops it when its holder dies, so a killed sync never leaves it behind.
    """
    import fcntl

    with open(root / LOCK_NAME, "a+") as fh:
        deadline, holder = time.monotonic() + wait_s, ""
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not holder:
                    fh.seek(0)
                    holder = fh.read().strip() or "unknown"
                    log.info(
                        "Waiting up to %.0fs for the sync writing to %s (pid %s)",
                        wait_s,
                        root,
                        holder,
                    )
                if time.monotonic() >= deadline:
                    raise SyncLocked(
                        f"another sync is writing to {root} (pid {holder}); wait for it to finish "
                        "or stop it, then sync again"
                    ) from None
                time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    """The sync manifest of `local_dir` as its last checkpoint left it (empty when there is none).

    The folder's state database is the truth while a sync runs or after one was killed;
    `sync_manifest.json` is its export at the end of a sync.
    """
    root = Path(local_dir)
    if (root / STATE_NAME).exists():
        with ManifestStore.open(root) as store:
            return store.to_dict()
    path = root / MANIFEST_NAME
    if not path.exists():
        return {"images": {}, "rejected": {}}
    return json.loads(path.read_text())


@dataclass(frozen=True)
class _Download:
    """One object to fetch: its key, listing identity, local path and the path of its old copy."""

    key: str
    ident: dict[str, Any]
    rel: str
    old: str | None


@dataclass
class _Sync:
    """What the steps of one sync share: where from, where to, the manifest and the tally."""

    cfg: StorageConfig
    client: Any
    root: Path
    prefix: str
    store: ManifestStore
    attempts: int
    limits: ImageLimits
    result: SyncResult = field(default_factory=SyncResult)

    def skip(self, key: str, reason: str, remember: dict[str, Any] | None = None) -> None:
        """Report `key` as skipped; with its identity, remember the reason until the object changes."""
        if remember is not None:
            self.store.put_rejected(key, {**remember, "reason": reason})
        self.result.skipped.append({"key": key, "reason": reason})


def sync_images(
    cfg: StorageConfig,
    client: Any | None = None,
    workers: int = 16,
    attempts: int = 4,
    checkpoint_every: int = 100,
    limits: ImageLimits | None = None,
    lock_wait_s: float = 60.0,
    manifest: dict[str, Any] | None = None,
) -> SyncResult:
    """Bring `cfg.local_dir` in line with `s3://bucket/prefix`: new and changed objects only.

    Images land atomically under `<local_dir>/<Class>/<name>`; rejects go to `quarantine/`, local
    copies of deleted or replaced objects to `trash/`. The manifest lives in `sync_state.sqlite`
    (see `manifest_store`), committed every `checkpoint_every` objects at a constant cost per
    object, so a sync killed at any point resumes where it stopped; `sync_manifest.json` is written
    from it at the end. Objects over the byte cap of `limits` (default: the settings) are never
    downloaded; images over its pixel cap are never decoded.

    One sync at a time writes to a folder: another one waits up to `lock_wait_s` seconds, then
    raises SyncLocked. `manifest` (e.g. the work store's copy) replaces the folder's own: objects it
    records unchanged are not downloaded again, even when the folder is empty (a fresh worker).
    """
    limits = limits or ImageLimits.from_env()  # a bad setting fails before anything is touched
    client = client or s3_client(cfg.conn_id, workers=workers)
    root = Path(cfg.local_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _folder_lock(root, lock_wait_s):
        started = time.monotonic()
        for stale in root.rglob(".*.part"):  # temporary files of a sync killed mid-write
            stale.unlink(missing_ok=True)
        prefix = cfg.prefix if not cfg.prefix or cfg.prefix.endswith("/") else cfg.prefix + "/"
        with ManifestStore.open(root) as store:
            if manifest is not None:
                store.replace(manifest)
            run = _Sync(cfg, client, root, prefix, store, attempts, limits)
            _list(run)
            _forget_deleted(run)
            _plan(run)
            _fetch_all(run, workers, checkpoint_every)
            _reconcile(run)
            return _finish(run, started)


def _list(run: _Sync) -> None:
    """Hold the listing of every object under the prefix, to compare with the manifest."""
    run.result.listed = run.store.set_listing(_listing_rows(run))


def _listing_rows(run: _Sync) -> Iterator[tuple[str, int, str, str]]:
    """(key, size, ETag, last modified) of each object, page by page; a clear error when the
    prefix cannot be listed."""
    cfg = run.cfg
    try:
        for obj in list_objects(run.client, cfg.bucket, run.prefix):
            ident = _identity(obj)
            yield obj["Key"], ident["size"], ident["etag"], ident["last_modified"]
    except Exception as exc:
        raise RuntimeError(
            f"cannot list s3://{cfg.bucket}/{run.prefix} through connection {cfg.conn_id!r}: {exc}. "
            "Check that the bucket exists and the connection's credentials and endpoint_url."
        ) from exc


def _forget_deleted(run: _Sync) -> None:
    """Objects gone from S3: forget them, keep their local copies in trash/."""
    for key, path in run.store.unlisted_images():
        run.store.drop_image(key)
        run.result.deleted += 1
        try:
            _move_aside(run.root / path, run.root, "trash", path)
        except Exception as exc:  # left in place; the reconciliation tries again next sync
            reason = f"deleted from S3, but its local copy stays: {first_line(exc)}"
            run.result.failed.append({"key": key, "reason": reason})
            continue
        log.info("Object %s was deleted from S3; local copy moved to trash/", key)
    run.store.drop_unlisted_rejected()


def _plan(run: _Sync) -> None:
    """Queue the objects to download; unchanged ones and those that cannot be used are tallied."""
    run.result.unchanged = run.store.unchanged()
    for key, ident, rejected_for, old in run.store.changed_listing():
        if key.endswith("/") and ident["size"] == 0:  # made by consoles' "create folder"
            run.skip(key, FOLDER_MARKER)
        elif rejected_for is not None:  # this very object was rejected before
            run.skip(key, rejected_for)
        else:
            _triage(run, key, ident, old)


def _triage(run: _Sync, key: str, ident: dict[str, Any], old: str | None) -> None:
    """A new or changed object: queue its download, unless the listing alone rejects it."""
    where = classify_key(key, run.prefix)
    if isinstance(where, str):
        run.skip(key, where, remember=ident)
        return
    if ident["size"] == 0:
        run.skip(key, "empty object (0 bytes)", remember=ident)
        return
    try:
        run.limits.check_bytes(ident["size"])
    except ImageRejected as exc:
        run.skip(key, str(exc), remember=ident)
        return
    rel = f"{where[0]}/{where[1]}"
    owner = run.store.queued_owner(rel) or run.store.image_owner(rel)
    if owner is not None and owner != key:
        run.skip(key, f"another key ({owner}) already maps to the local file {rel}")
        return
    run.store.enqueue(key, ident, rel, old)


def _fetch(run: _Sync, item: _Download) -> tuple[str, str]:
    """Download, check and store one object in a worker thread: (outcome, sha256 or reason).

    Decoding and fsync'd writes run here, beside the downloads, rather than one at a time
    in the thread that collects results.
    """

    def get() -> bytes:
        body = run.client.get_object(Bucket=run.cfg.bucket, Key=item.key)["Body"]
        with body:
            data = body.read(run.limits.max_bytes + 1)
        run.limits.check_bytes(len(data))  # it grew past the cap after it was listed
        return data

    try:
        data = _with_backoff(get, run.attempts)
    except ImageRejected as exc:
        return "rejected", str(exc)
    except Exception as exc:  # one object failing must not stop the others
        return "failed", f"download failed: {exc}"
    try:
        return _store(run, item, data)
    except Exception as exc:  # a full disk, a permission error: this object only
        return "failed", f"cannot store {item.rel}: {type(exc).__name__}: {first_line(exc)}"


def _store(run: _Sync, item: _Download, data: bytes) -> tuple[str, str]:
    """Check `data` and put it in place: rejects in quarantine/, replaced copies in trash/."""
    root = run.root
    try:
        validate_image(data, run.limits)
    except ImageRejected as exc:
        _atomic_write_bytes(root / "quarantine" / item.rel, data)
        if item.old is not None:  # the object was replaced by a bad version
            _move_aside(root / item.old, root, "trash", item.old)
        return "rejected", str(exc)
    tmp = _write_temp(root / item.rel, (data,))  # first, so that a full disk leaves the old copy
    try:
        if item.old is not None:
            _move_aside(root / item.old, root, "trash", item.old)
        os.replace(tmp, root / item.rel)
    finally:
        tmp.unlink(missing_ok=True)
    return "stored", hashlib.sha256(data).hexdigest()


def _apply(run: _Sync, item: _Download, outcome: str, detail: str) -> None:
    """Record one finished download in the manifest and the tally (in the collecting thread)."""
    if outcome == "failed":
        run.result.failed.append({"key": item.key, "reason": detail})
        log.warning("%s failed, will retry next sync: %s", item.key, detail)
        if item.old is not None and not (run.root / item.old).exists():
            run.store.drop_image(item.key)  # its old copy went to trash before the failure
        return
    run.result.downloaded += 1
    if outcome == "rejected":
        run.store.drop_image(item.key)
        run.skip(item.key, detail, remember=item.ident)
        log.warning("Quarantined %s: %s", item.key, detail)
        return
    run.store.drop_rejected(item.key)
    run.result.stored += 1
    label = item.rel.split("/")[0]
    run.store.put_image(
        item.key, {**item.ident, "path": item.rel, "label": label, "sha256": detail}
    )


def _fetch_all(run: _Sync, workers: int, checkpoint_every: int) -> None:
    """Fetch the queued objects on `workers` threads; commit the manifest every `checkpoint_every`.

    At most two downloads per thread are submitted ahead, so memory does not grow with the queue.
    """
    log.info(
        "Syncing s3://%s/%s: %d listed, %d unchanged, %d to download",
        run.cfg.bucket,
        run.prefix,
        run.result.listed,
        run.result.unchanged,
        total := run.store.count_queued(),
    )
    done, window = 0, 2 * max(1, workers)
    queued = (_Download(*row) for row in run.store.queued())
    pending: dict[Future[tuple[str, str]], _Download] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, _cancel_on_interrupt(pool):
        while True:
            while len(pending) < window and (item := next(queued, None)) is not None:
                pending[pool.submit(_fetch, run, item)] = item
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                outcome, detail = future.result()
                _apply(run, pending.pop(future), outcome, detail)
                if outcome == "failed":
                    continue
                done += 1
                if done % checkpoint_every == 0:
                    run.store.commit()
                if done % PROGRESS_EVERY == 0:
                    log.info("Downloaded %d/%d objects", done, total)
    run.store.commit()


def _reconcile(run: _Sync) -> None:
    """Move class-folder images the manifest does not record to trash/.

    A sync killed after writing files but before its next manifest checkpoint leaves such files;
    the resumed sync fetches again those still in S3, and the others would stay forever.
    """
    for folder in sorted(p for p in run.root.iterdir() if p.is_dir() and class_of_folder(p.name)):
        with os.scandir(folder) as entries:  # streamed into the store: no list of every file
            strays = run.store.unrecorded(
                f"{folder.name}/{e.name}" for e in entries if e.is_file() and is_image_name(e.name)
            )
        for rel in strays:
            try:
                _move_aside(run.root / rel, run.root, "trash", rel)
            except Exception as exc:  # left in place; tried again next sync
                reason = f"not in the manifest, and cannot move to trash: {first_line(exc)}"
                run.result.failed.append({"key": rel, "reason": reason})
                continue
            run.result.reconciled += 1
            log.warning("Moved %s to trash/: no object recorded in the manifest owns it", rel)


def _report_conflicts(run: _Sync) -> None:
    """Name every stored copy of content found under two classes in the report (they stay stored)."""
    for conflict in label_conflicts(run.store.conflicting_entries()):
        keys = [key for names in conflict.copies.values() for key in names]
        log.warning("%s: %s", conflict.reason, ", ".join(keys))
        for key in keys:
            run.skip(key, conflict.reason)


def _export_manifest(run: _Sync) -> None:
    """Write `sync_manifest.json` from the store, unless the file already holds exactly that."""
    path = run.root / MANIFEST_NAME
    head = {"bucket": run.cfg.bucket, "digest": run.result.digest, "prefix": run.prefix}
    if run.store.export_is_current(path, head):
        return
    _atomic_write(path, (chunk.encode() for chunk in run.store.manifest_chunks(head)))
    run.store.mark_exported(path, head)
    run.store.commit()


def _finish(run: _Sync, started: float) -> SyncResult:
    """Write the final manifest (with the digest) and the report; log the tally."""
    _report_conflicts(run)
    result, root = run.result, run.root
    result.images = run.store.count_images()
    result.digest = _digest_of_sorted(run.store.digest_entries())
    _export_manifest(run)
    result.seconds = round(time.monotonic() - started, 3)
    result.manifest_path = str(root / MANIFEST_NAME)
    result.report_path = str(root / REPORT_NAME)
    _atomic_write_json(root / REPORT_NAME, asdict(result))
    log.info(
        "Sync done in %.1fs: %d images (%d new or changed, %d unchanged, %d deleted, "
        "%d unrecorded files moved to trash), %d skipped, %d failed; dataset digest %s",
        result.seconds,
        result.images,
        result.stored,
        result.unchanged,
        result.deleted,
        result.reconciled,
        len(result.skipped),
        len(result.failed),
        result.digest[:12],
    )
    return result


def _ensure_bucket(client: Any, bucket: str, conn_id: str) -> None:
    """Create `bucket` when S3 says it does not exist; any other error is raised, with what to do."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (401, 403) or code in ("403", "AccessDenied", "Forbidden"):
            raise RuntimeError(
                f"access denied to bucket {bucket} through connection {conn_id!r} (HTTP {status}): "
                "it belongs to another account, or the credentials may not list it. Fix the "
                "connection's credentials or the bucket policy; nothing was uploaded"
            ) from exc
        if status != 404 and code not in ("404", "NoSuchBucket", "NotFound"):
            raise RuntimeError(
                f"cannot check bucket {bucket} through connection {conn_id!r}: HTTP {status} "
                f"{code}: {first_line(exc)}; nothing was uploaded"
            ) from exc
    except BotoCoreError as exc:
        raise RuntimeError(
            f"cannot reach S3 to check bucket {bucket} through connection {conn_id!r}: "
            f"{first_line(exc)}. Check the connection's endpoint_url and the network"
        ) from exc
    client.create_bucket(Bucket=bucket)
    log.info("Created bucket %s", bucket)


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
        _ensure_bucket(client, bucket, conn_id)
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
