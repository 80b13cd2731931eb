"""S3 sync and upload against moto's S3 server over HTTP (no in-process mocking).

Every test talks to a real HTTP endpoint through the Airflow connection, as the DAG does; request
counts come from the server, so "no GET" means no object was fetched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from leukemia import storage
from leukemia.config import CLASSES, StorageConfig
from leukemia.dev.embedded import (
    LOCAL_ACCESS_KEY,
    LOCAL_REGION,
    LOCAL_SECRET_KEY,
    S3Server,
    aws_connection_json,
)
from leukemia.images import iter_image_files, validate_image
from leukemia.manifest_store import ManifestStore
from leukemia.storage import (
    MANIFEST_NAME,
    REPORT_NAME,
    STATE_NAME,
    SyncResult,
    dataset_digest,
    load_manifest,
    s3_client,
    sync_images,
    upload_folder,
)

# --- helpers ----------------------------------------------------------------------------------


def jpeg(seed: int, side: int = 48) -> bytes:
    """A small, valid noise JPEG; distinct seeds give distinct bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def put_all(client: Any, bucket: str, objects: dict[str, bytes]) -> None:
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def s3_state(client: Any, bucket: str) -> dict[str, tuple[str, int, Any, str]]:
    """key -> (etag, size, last modified, sha256 of the bytes) for every object in the bucket."""
    state = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            state[obj["Key"]] = (
                obj["ETag"],
                obj["Size"],
                obj["LastModified"],
                hashlib.sha256(body).hexdigest(),
            )
    return state


def local_path(root: Path, key: str) -> Path:
    """Where a good `raw/<class>/<name>` key must land: `<root>/<Class>/<name>`."""
    _, folder, name = key.split("/")
    return root / {c.lower(): c for c in CLASSES}[folder.lower()] / name


def gets(server: S3Server) -> int:
    """Object GETs the server answered since the last reset (listings are counted apart)."""
    return server.requests.counts.get("GET", 0)


def reset_when_settled(server: S3Server, quiet_s: float = 0.5, limit_s: float = 10.0) -> None:
    """Reset the request counts once no request has arrived for `quiet_s`: a killed client's
    last request can still be in the server's queue when the client is gone, and must not be
    counted against the next sync."""
    deadline = time.monotonic() + limit_s
    seen = dict(server.requests.counts)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = dict(server.requests.counts)
        if now == seen:
            break
        seen = now
    server.requests.reset()


def iter_image_files_paths(root: Path) -> list[Path]:
    return [p for _, p in iter_image_files(root)]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def trashed(root: Path, name: str) -> list[bytes]:
    """Contents of every copy of `name` kept in `trash/`."""
    return sorted(p.read_bytes() for p in (root / "trash").rglob(name))


class SmallPages:
    """A client whose listings come `page_size` keys a page, so that pagination is exercised."""

    def __init__(self, client: Any, page_size: int) -> None:
        self._client, self._page_size = client, page_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_paginator(self, operation: str) -> Any:
        paginator, page_size = self._client.get_paginator(operation), self._page_size

        class Paginator:
            def paginate(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
                return paginator.paginate(PaginationConfig={"PageSize": page_size}, **kwargs)

        return Paginator()


class FlakyS3Server(S3Server):
    """The same moto backend behind an endpoint that fails the first `failures` GETs of each object
    (of the objects in `only`, when given), alternately with 503 SlowDown and 500 InternalError,
    the way S3 answers under load."""

    def __init__(self, failures: int, only: set[str] | None = None) -> None:
        super().__init__()
        self.failures, self.only = failures, only
        self.gets: Counter[str] = Counter()
        self._lock = threading.Lock()

    def start(self) -> FlakyS3Server:
        super().start()
        app = self._server.app

        def flaky(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            is_object_get = (
                environ["REQUEST_METHOD"] == "GET"
                and "list-type" not in environ.get("QUERY_STRING", "")
                and path.strip("/").count("/") >= 1
            )
            if is_object_get and (self.only is None or path.split("/", 2)[2] in self.only):
                with self._lock:
                    self.gets[path] += 1
                    attempt = self.gets[path]
                if attempt <= self.failures:
                    code, status = (
                        ("SlowDown", "503 Slow Down")
                        if attempt % 2
                        else ("InternalError", "500 Internal Server Error")
                    )
                    body = (
                        '<?xml version="1.0" encoding="UTF-8"?>'
                        f"<Error><Code>{code}</Code><Message>try again</Message></Error>"
                    ).encode()
                    start_response(
                        status,
                        [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
                    )
                    return [body]
            return app(environ, start_response)

        self._server.app = flaky  # werkzeug's handler calls server.app for each request
        return self


class ForbiddingS3Server(S3Server):
    """The same moto backend behind an endpoint that answers 403 AccessDenied to the requests
    `forbid(method, "bucket/key")` picks, the way S3 answers when a policy denies them."""

    def __init__(self, forbid: Callable[[str, str], bool]) -> None:
        super().__init__()
        self.forbid = forbid

    def start(self) -> ForbiddingS3Server:
        super().start()
        app = self._server.app

        def forbidding(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
            target = environ.get("PATH_INFO", "").strip("/")
            if self.forbid(environ["REQUEST_METHOD"], target):
                body = (
                    b'<?xml version="1.0" encoding="UTF-8"?>'
                    b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                )
                headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
                start_response("403 Forbidden", headers)
                return [body] if environ["REQUEST_METHOD"] != "HEAD" else []
            return app(environ, start_response)

        self._server.app = forbidding
        return self


@pytest.fixture()
def client(aws_env: S3Server) -> Any:
    """A client through the Airflow connection, for arranging buckets and checking them."""
    return s3_client("aws_default")


@pytest.fixture()
def images_dir(tmp_path: Path) -> Path:
    return tmp_path / "images"


def good_set(n: int, seed: int = 0) -> dict[str, bytes]:
    """`n` good images spread over the four classes, keyed `raw/<Class>/img-<i>.jpg`."""
    return {f"raw/{CLASSES[i % 4]}/img-{i:03d}.jpg": jpeg(seed * 1000 + i) for i in range(n)}


# --- first sync -------------------------------------------------------------------------------


def test_first_sync_lands_every_image_byte_identical_with_a_full_manifest(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    objects = good_set(28)
    objects["raw/benign/lower.jpg"] = jpeg(901)  # class folders match case-insensitively
    objects["raw/PRO/upper.JPG"] = jpeg(902)
    put_all(client, bucket, objects)
    aws_env.requests.reset()

    result = sync_images(
        StorageConfig(bucket=bucket, local_dir=images_dir), client=SmallPages(client, 7)
    )

    assert (result.listed, result.stored, result.images) == (30, 30, 30)
    assert result.skipped == [] and result.failed == []
    assert aws_env.requests.counts == {"LIST": 5, "GET": 30}  # 30 keys, 7 a page: 5 pages
    for key, body in objects.items():
        assert local_path(images_dir, key).read_bytes() == body, key
    assert (images_dir / "Benign" / "lower.jpg").exists()
    assert (images_dir / "Pro" / "upper.JPG").exists()
    assert sorted(p.name for p in images_dir.iterdir() if p.is_dir()) == list(CLASSES)

    manifest = json.loads((images_dir / MANIFEST_NAME).read_text())
    assert set(manifest["images"]) == set(objects)
    for key, entry in manifest["images"].items():
        body = objects[key]
        assert entry["size"] == len(body)
        assert entry["etag"] == hashlib.md5(body).hexdigest()  # single-part upload: ETag is the MD5
        assert datetime.fromisoformat(entry["last_modified"]).tzinfo is not None
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()
        assert entry["path"] == local_path(images_dir, key).relative_to(images_dir).as_posix()
    expected = dataset_digest(
        (local_path(images_dir, k).parent.name, hashlib.sha256(b).hexdigest())
        for k, b in objects.items()
    )
    assert result.digest == manifest["digest"] == expected
    assert json.loads((images_dir / REPORT_NAME).read_text())["stored"] == 30


def test_noop_resync_only_lists_and_rewrites_nothing(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    put_all(client, bucket, good_set(12))
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)
    first = sync_images(cfg)
    files = [*iter_image_files_paths(images_dir), images_dir / MANIFEST_NAME]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    aws_env.requests.reset()

    again = sync_images(cfg)

    assert aws_env.requests.counts == {"LIST": 1}
    assert (again.unchanged, again.downloaded, again.stored, again.deleted) == (12, 0, 0, 0)
    assert (
        again.digest
        == first.digest
        == json.loads((images_dir / MANIFEST_NAME).read_text())["digest"]
    )
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stamps


def test_resync_into_an_empty_folder_from_a_given_manifest_only_lists(
    aws_env: S3Server, bucket: str, client: Any, tmp_path: Path
) -> None:
    """A fresh worker: its folder is empty, the manifest comes from the work store."""
    put_all(client, bucket, good_set(12))
    first = sync_images(StorageConfig(bucket=bucket, local_dir=tmp_path / "worker-1"))
    manifest = json.loads((tmp_path / "worker-1" / MANIFEST_NAME).read_text())
    aws_env.requests.reset()

    again = sync_images(
        StorageConfig(bucket=bucket, local_dir=tmp_path / "worker-2"), manifest=manifest
    )

    assert aws_env.requests.counts == {"LIST": 1}
    assert (again.unchanged, again.downloaded, again.images) == (12, 0, 12)
    assert again.digest == first.digest
    saved = json.loads((tmp_path / "worker-2" / MANIFEST_NAME).read_text())
    assert saved["images"] == manifest["images"]


# --- incremental resync -----------------------------------------------------------------------


def test_resync_fetches_only_new_and_changed_and_keeps_replaced_copies_in_trash(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    original = good_set(8)
    put_all(client, bucket, original)
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)
    first = sync_images(cfg)

    changed_key, deleted_key = "raw/Benign/img-000.jpg", "raw/Early/img-001.jpg"
    added = {"raw/Pre/new-1.jpg": jpeg(501), "raw/Pro/new-2.jpg": jpeg(502)}
    put_all(client, bucket, {**added, changed_key: jpeg(503)})
    client.delete_object(Bucket=bucket, Key=deleted_key)
    aws_env.requests.reset()

    second = sync_images(cfg)

    assert gets(aws_env) == 3  # two new, one changed; the other six are not fetched
    assert (second.stored, second.unchanged, second.deleted, second.images) == (3, 6, 1, 9)
    assert local_path(images_dir, changed_key).read_bytes() == jpeg(503)
    for key, body in added.items():
        assert local_path(images_dir, key).read_bytes() == body
    assert not local_path(images_dir, deleted_key).exists()
    assert trashed(images_dir, "img-001.jpg") == [original[deleted_key]]
    assert trashed(images_dir, "img-000.jpg") == [original[changed_key]]
    assert second.digest != first.digest

    # Back to the original set: the same images give back the same digest.
    for key in added:
        client.delete_object(Bucket=bucket, Key=key)
    put_all(
        client, bucket, {changed_key: original[changed_key], deleted_key: original[deleted_key]}
    )
    aws_env.requests.reset()

    third = sync_images(cfg)

    assert gets(aws_env) == 2
    assert (third.stored, third.deleted, third.images) == (2, 2, 8)
    assert third.digest == first.digest
    for key, body in original.items():
        assert local_path(images_dir, key).read_bytes() == body
    # Both replaced versions are kept, even when two syncs replace the same file in one second.
    assert trashed(images_dir, "img-000.jpg") == sorted([original[changed_key], jpeg(503)])
    assert sorted(p.name for p in (images_dir / "trash").rglob("new-*.jpg")) == [
        "new-1.jpg",
        "new-2.jpg",
    ]


# --- a sync killed half-way -------------------------------------------------------------------

_KILLED_SYNC = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path

    import boto3

    from leukemia.config import StorageConfig
    from leukemia.storage import load_manifest, sync_images

    endpoint, bucket, local_dir, kill_at = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ["AWS_DEFAULT_REGION"])
    lock, calls = threading.Lock(), [0]

    class DiesMidway:
        def __getattr__(self, name):
            return getattr(s3, name)

        def get_object(self, **kwargs):
            with lock:
                calls[0] += 1
                n = calls[0]
            if n == kill_at:
                # Wait for a checkpoint, then die the way an OOM kill or a lost worker does:
                # at once, whatever the other threads are doing.
                deadline = time.monotonic() + 20
                while not load_manifest(local_dir)["images"] and time.monotonic() < deadline:
                    time.sleep(0.005)
                os.kill(os.getpid(), signal.SIGKILL)
            return s3.get_object(**kwargs)

    sync_images(StorageConfig(bucket=bucket, local_dir=local_dir), client=DiesMidway(),
                workers=4, checkpoint_every=5)
    """
)


def test_killed_sync_leaves_only_whole_images_and_the_next_sync_finishes_the_rest(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    objects = good_set(40)
    put_all(client, bucket, objects)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
        "AWS_DEFAULT_REGION": LOCAL_REGION,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "include"), *sys.path]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SYNC, aws_env.endpoint_url, bucket, str(images_dir), "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # Whatever the kill interrupted: every visible image is whole and is the object's bytes,
    # and the checkpointed manifest's entries match the files.
    by_path = {local_path(images_dir, k): b for k, b in objects.items()}
    visible = iter_image_files_paths(images_dir)
    assert 0 < len(visible) < len(objects)
    for path in visible:
        validate_image(path.read_bytes())
        assert path.read_bytes() == by_path[path]
    recorded = load_manifest(images_dir)["images"]
    assert 5 <= len(recorded) < len(objects)
    for entry in recorded.values():
        assert (
            hashlib.sha256((images_dir / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
        )
    # A temporary file from a write the kill cut short (planted, as the kill may miss one).
    (images_dir / "Pro").mkdir(exist_ok=True)
    (images_dir / "Pro" / ".img-003.jpg.0123abcd.part").write_bytes(
        objects["raw/Pro/img-003.jpg"][:99]
    )
    aws_env.requests.reset()

    resumed = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir))

    assert gets(aws_env) == len(objects) - len(recorded)  # only what was missing or unrecorded
    assert (resumed.unchanged, resumed.images, resumed.failed) == (len(recorded), 40, [])
    for key, body in objects.items():
        assert local_path(images_dir, key).read_bytes() == body
    assert list(images_dir.rglob("*.part")) == []


def test_files_written_after_the_last_checkpoint_and_then_deleted_from_s3_go_to_trash(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    first = good_set(5)
    put_all(client, bucket, first)
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)
    sync_images(cfg)
    checkpoint = (images_dir / STATE_NAME).read_bytes()
    later = {f"raw/{c}/late-{c}.jpg": jpeg(700 + i) for i, c in enumerate(CLASSES[:3])}
    put_all(client, bucket, later)
    sync_images(cfg)
    # Killed after writing the three files, before the manifest checkpoint that records them ...
    (images_dir / STATE_NAME).write_bytes(checkpoint)
    # ... and two of those objects are deleted from S3 before the next sync.
    gone = ["raw/Benign/late-Benign.jpg", "raw/Early/late-Early.jpg"]
    for key in gone:
        client.delete_object(Bucket=bucket, Key=key)

    resumed = sync_images(cfg)

    assert resumed.failed == [] and resumed.images == len(first) + 1
    assert resumed.reconciled == 2
    for key in gone:
        assert not local_path(images_dir, key).exists()
        assert trashed(images_dir, key.rsplit("/", 1)[1]) == [later[key]]
    kept = "raw/Pre/late-Pre.jpg"
    assert local_path(images_dir, kept).read_bytes() == later[kept]
    recorded = {
        e["path"] for e in json.loads((images_dir / MANIFEST_NAME).read_text())["images"].values()
    }
    assert {
        p.relative_to(images_dir).as_posix() for p in iter_image_files_paths(images_dir)
    } == recorded


def test_ctrl_c_stops_the_sync_at_once_and_the_next_sync_resumes(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    objects = good_set(60)
    put_all(client, bucket, objects)
    lock, calls = threading.Lock(), [0]

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def get_object(self, **kwargs: Any) -> Any:
            with lock:
                calls[0] += 1
            return client.get_object(**kwargs)

    # Ctrl-C reaches the main thread while it collects results: raise it there, at the first
    # manifest checkpoint (deterministic, unlike a real signal's timing under load)
    def interrupted(store: ManifestStore) -> None:
        raise KeyboardInterrupt

    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)
    with (
        mock.patch.object(ManifestStore, "commit", interrupted),
        pytest.raises(KeyboardInterrupt),
    ):
        sync_images(cfg, client=Counting(), workers=4, checkpoint_every=5)

    assert calls[0] < 30  # the queued downloads were dropped, not all fetched before stopping
    for path in iter_image_files_paths(images_dir):
        validate_image(path.read_bytes())
    resumed = sync_images(cfg)
    assert (resumed.images, resumed.failed) == (60, [])
    for key, body in objects.items():
        assert local_path(images_dir, key).read_bytes() == body
    assert list(images_dir.rglob("*.part")) == []


_KILLED_IN_A_CHECKPOINT = textwrap.dedent(
    """
    import os, signal, sys, threading
    from pathlib import Path

    import boto3

    from leukemia.config import StorageConfig
    from leukemia.manifest_store import ManifestStore
    from leukemia.storage import sync_images

    endpoint, bucket, local_dir, kill_in = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ["AWS_DEFAULT_REGION"])
    real_commit, commits = ManifestStore.commit, [0]

    def commit(self):
        commits[0] += 1
        if commits[0] == kill_in:
            # SIGKILL from another thread, which runs as soon as the commit releases the GIL:
            # the process dies while SQLite writes the checkpoint.
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGKILL)).start()
        real_commit(self)

    ManifestStore.commit = commit
    sync_images(StorageConfig(bucket=bucket, local_dir=local_dir), client=s3, workers=4,
                checkpoint_every=25)
    """
)


def class_folder_files(root: Path) -> dict[str, bytes]:
    """`<Class>/<name>` -> bytes of every file in the class folders of `root`."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for folder in CLASSES
        if (root / folder).is_dir()
        for p in (root / folder).iterdir()
    }


def test_sync_killed_mid_checkpoint_resumes_to_the_same_files_and_manifest_as_a_clean_sync(
    aws_env: S3Server, bucket: str, client: Any, tmp_path: Path
) -> None:
    objects = good_set(240)
    put_all(client, bucket, objects)
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    clean = sync_images(StorageConfig(bucket=bucket, local_dir=clean_dir))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
        "AWS_DEFAULT_REGION": LOCAL_REGION,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "include"), *sys.path]),
    }
    args = [aws_env.endpoint_url, bucket, str(killed_dir), "4"]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_A_CHECKPOINT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # The state holds whole checkpoints only: the three committed, or the fourth when the kill
    # came after SQLite finished it, never part of one.
    recorded = load_manifest(killed_dir)["images"]
    assert len(recorded) in (75, 100)
    reset_when_settled(aws_env)

    resumed = sync_images(StorageConfig(bucket=bucket, local_dir=killed_dir))

    assert gets(aws_env) == len(objects) - len(recorded)
    assert (resumed.unchanged, resumed.images, resumed.failed) == (len(recorded), 240, [])
    assert resumed.digest == clean.digest
    assert class_folder_files(killed_dir) == class_folder_files(clean_dir)
    assert (killed_dir / MANIFEST_NAME).read_bytes() == (clean_dir / MANIFEST_NAME).read_bytes()


def test_manifest_file_deleted_between_syncs_is_written_again_byte_identical_without_a_get(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    objects = good_set(6)
    objects["raw/Pro/broken.jpg"] = b"not a jpeg at all"
    put_all(client, bucket, objects)
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)
    sync_images(cfg)
    written = (images_dir / MANIFEST_NAME).read_bytes()
    (images_dir / MANIFEST_NAME).unlink()
    aws_env.requests.reset()

    again = sync_images(cfg)

    assert aws_env.requests.counts == {"LIST": 1}
    assert (images_dir / MANIFEST_NAME).read_bytes() == written
    # The format is json.dumps(manifest, indent=1, sort_keys=True), as before the state database.
    manifest = json.loads(written)
    assert written == json.dumps(manifest, indent=1, sort_keys=True).encode()
    assert set(manifest["images"]) == set(objects) - {"raw/Pro/broken.jpg"}
    assert set(manifest["rejected"]) == {"raw/Pro/broken.jpg"}
    assert manifest["digest"] == again.digest


def test_folder_synced_before_the_state_database_existed_resumes_from_its_json_manifest(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    put_all(client, bucket, good_set(10))
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)
    first = sync_images(cfg)
    written = (images_dir / MANIFEST_NAME).read_bytes()
    (images_dir / STATE_NAME).unlink()  # as an older version of the sync left the folder
    aws_env.requests.reset()

    again = sync_images(cfg)

    assert aws_env.requests.counts == {"LIST": 1}
    assert (again.unchanged, again.downloaded, again.digest) == (10, 0, first.digest)
    assert (images_dir / MANIFEST_NAME).read_bytes() == written


# --- bad inputs -------------------------------------------------------------------------------


def test_bad_objects_are_reported_and_quarantined_never_escape_and_s3_is_never_modified(
    aws_env: S3Server, bucket: str, client: Any, tmp_path: Path
) -> None:
    real = jpeg(7, side=96)
    bomb = bytearray(real)  # a real JPEG whose header claims 60000 x 60000 pixels
    sof = bomb.find(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    good = good_set(4, seed=3)
    bad = {
        "raw/Early/truncated.jpg": (real[: len(real) // 2], "corrupt or truncated"),
        "raw/Pre/notes.jpg": (b"patient notes, not an image\n" * 4, "not an image"),
        "raw/Pro/empty.jpg": (b"", "empty object"),
        "raw/Benign/tiny.jpg": (jpeg(8, side=16), "too small"),
        "raw/Pro/bomb.jpg": (bytes(bomb), "image too large"),
        "raw/loose.jpg": (real, "outside a class folder"),
        "raw/Mystery/a.jpg": (real, "unknown class folder 'Mystery'"),
        "raw/Pro/../../evil.jpg": (real, "unsafe key"),
        "raw//etc/passwd.jpg": (real, "unsafe key"),
        "raw/Pro/sub/deeper.jpg": (real, "nested folder"),
        "raw/Pre/readme.txt": (b"hello", "not an image file name"),
    }
    put_all(client, bucket, {**good, **{k: body for k, (body, _) in bad.items()}})
    before = s3_state(client, bucket)
    images_dir = tmp_path / "sandbox" / "images"
    aws_env.requests.reset()

    result = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir))

    # Only the good ones and the four whose content must be looked at were fetched.
    assert gets(aws_env) == len(good) + 4
    assert result.images == len(good) and result.failed == []
    for key, body in good.items():
        assert local_path(images_dir, key).read_bytes() == body
    assert all(p.is_relative_to(images_dir) for p in files_under(tmp_path))
    assert not Path("/etc/passwd.jpg").exists()

    report = json.loads((images_dir / REPORT_NAME).read_text())
    reasons = {s["key"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == set(bad)
    for key, (_, why) in bad.items():
        assert why in reasons[key], (key, reasons[key])
    for key in (
        "raw/Early/truncated.jpg",
        "raw/Pre/notes.jpg",
        "raw/Benign/tiny.jpg",
        "raw/Pro/bomb.jpg",
    ):
        quarantined = (
            images_dir / "quarantine" / local_path(images_dir, key).relative_to(images_dir)
        )
        assert quarantined.read_bytes() == bad[key][0]
        assert not local_path(images_dir, key).exists()

    assert s3_state(client, bucket) == before  # S3 is only ever read
    aws_env.requests.reset()

    again = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir))

    assert aws_env.requests.counts == {"LIST": 1}  # rejects are remembered, not fetched again
    assert {s["key"] for s in again.skipped} == set(bad)
    assert again.digest == result.digest


def test_image_replaced_by_a_corrupt_version_leaves_the_data_set(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    objects = good_set(4)
    put_all(client, bucket, objects)
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)
    sync_images(cfg)
    key = "raw/Early/img-001.jpg"
    client.put_object(Bucket=bucket, Key=key, Body=b"<html>503 from a broken upload</html>")

    result = sync_images(cfg)

    assert [s["key"] for s in result.skipped] == [key]
    assert "not an image" in result.skipped[0]["reason"]
    assert not local_path(images_dir, key).exists()
    assert trashed(images_dir, "img-001.jpg") == [objects[key]]
    assert (images_dir / "quarantine" / "Early" / "img-001.jpg").exists()
    assert result.images == 3
    assert result.digest == dataset_digest(
        (local_path(images_dir, k).parent.name, hashlib.sha256(b).hexdigest())
        for k, b in objects.items()
        if k != key
    )


# --- every key left out of the data set is named in the report ---------------------------------


def wide_tiff(samples: np.ndarray) -> bytes:
    """A TIFF of `samples` as they are (16-bit, 32-bit float), written by tifffile."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, samples)
    return buf.getvalue()


def grey16_png(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(samples).save(buf, "PNG")  # uint16 → a 16-bit grey PNG
    return buf.getvalue()


def test_16bit_images_land_and_wide_images_that_cannot_be_converted_are_quarantined_with_the_reason(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    gradient = np.tile(np.rint(np.linspace(0, 65535, 64)).astype(np.uint16), (48, 1))
    nan = (gradient / 65535.0).astype(np.float32)
    nan[10, 10] = np.nan
    wide = {
        "raw/Pro/grey16.png": grey16_png(gradient),
        "raw/Early/grey16.tif": wide_tiff(gradient),
        "raw/Pre/float-0-1.tif": wide_tiff((gradient / 65535.0).astype(np.float32)),
    }
    unconvertible = {
        "raw/Benign/nan.tif": (wide_tiff(nan), "NaN or infinite values in 1 of 3,072 pixels"),
        "raw/Pro/1e6.tif": (
            wide_tiff((gradient * 15.0).astype(np.float32)),
            "values span 0 to 983025",
        ),
    }
    good = good_set(4)
    put_all(client, bucket, {**good, **wide, **{k: b for k, (b, _) in unconvertible.items()}})
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)

    result = sync_images(cfg)

    assert (result.stored, result.images, result.failed) == (7, 7, [])
    for key, body in {**good, **wide}.items():
        assert local_path(images_dir, key).read_bytes() == body
    reasons = {s["key"]: s["reason"] for s in result.skipped}
    assert set(reasons) == set(unconvertible)
    for key, (body, why) in unconvertible.items():
        assert reasons[key].startswith("cannot convert a 32-bit float image to 8-bit faithfully")
        assert why in reasons[key], reasons[key]
        rel = local_path(images_dir, key).relative_to(images_dir)
        assert (images_dir / "quarantine" / rel).read_bytes() == body  # kept, byte-identical
        assert not (images_dir / rel).exists()
    manifest = json.loads((images_dir / MANIFEST_NAME).read_text())
    assert set(manifest["images"]) == {*good, *wide}
    report = json.loads((images_dir / REPORT_NAME).read_text())
    assert {s["key"]: s["reason"] for s in report["skipped"]} == reasons
    aws_env.requests.reset()

    again = sync_images(cfg)

    assert aws_env.requests.counts == {"LIST": 1}  # rejects are remembered, not fetched again
    assert {s["key"]: s["reason"] for s in again.skipped} == reasons


def test_folder_marker_is_named_in_the_report_as_a_folder_marker(
    bucket: str, client: Any, images_dir: Path
) -> None:
    good = good_set(4)
    put_all(client, bucket, {**good, "raw/Benign/": b""})

    result = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir))

    marker = [{"key": "raw/Benign/", "reason": "folder marker (0-byte key ending in /)"}]
    assert (result.listed, result.images, result.failed) == (5, 4, [])
    assert result.skipped == marker
    assert json.loads((images_dir / REPORT_NAME).read_text())["skipped"] == marker
    assert result.summary()["skipped"] == 1


def test_identical_content_under_two_classes_names_every_copy_with_the_majority_class(
    bucket: str, client: Any, images_dir: Path
) -> None:
    from leukemia.dataset import build_manifest, split_records

    same = jpeg(777)
    copies = {
        "raw/Pro/a.jpg": same,
        "raw/Pro/b.jpg": same,
        "raw/Pro/c.jpg": same,
        "raw/Benign/d.jpg": same,
    }
    good = good_set(8)
    put_all(client, bucket, {**good, **copies})
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)

    result = sync_images(cfg)

    sha = hashlib.sha256(same).hexdigest()
    reason = (
        f"label conflict: identical content (sha256 {sha[:12]}) under Benign x1, Pro x3; "
        "majority Pro (3 of 4 copies); every copy is left out of the data set: delete or move "
        "the wrong copies"
    )
    assert result.skipped == [{"key": key, "reason": reason} for key in sorted(copies)]
    report = json.loads((images_dir / REPORT_NAME).read_text())
    assert {s["key"]: s["reason"] for s in report["skipped"]} == dict.fromkeys(copies, reason)
    assert result.images == 12 and result.failed == []  # stored, so nothing is lost
    assert all(local_path(images_dir, key).read_bytes() == same for key in copies)

    rows, conflicts, _ = split_records(build_manifest(images_dir))

    assert len(rows) == 8 and {r["sha256"] for r in rows}.isdisjoint({sha})
    assert conflicts == [
        {
            "sha256": sha,
            "labels": ["Benign", "Pro"],
            "paths": ["Benign/d.jpg", "Pro/a.jpg", "Pro/b.jpg", "Pro/c.jpg"],
            "majority": "Pro",
        }
    ]
    again = sync_images(cfg)  # reported on every sync while the copies are there
    assert again.skipped == result.skipped and again.unchanged == 12


def test_label_conflict_tie_names_the_tied_classes_and_has_no_majority() -> None:
    entries = [
        ("raw/Early/a.jpg", "Early", "s1"),
        ("raw/Pre/b.jpg", "Pre", "s1"),
        ("raw/Pro/c.jpg", "Pro", "s1"),
        ("raw/Pro/d.jpg", "Pro", "s1"),
        ("raw/Early/e.jpg", "Early", "s1"),
        ("raw/Pro/only.jpg", "Pro", "s2"),
    ]

    [conflict] = storage.label_conflicts(entries)

    assert conflict.majority is None
    assert conflict.copies == {
        "Early": ["raw/Early/a.jpg", "raw/Early/e.jpg"],
        "Pre": ["raw/Pre/b.jpg"],
        "Pro": ["raw/Pro/c.jpg", "raw/Pro/d.jpg"],
    }
    assert "under Early x2, Pre x1, Pro x2; a tie between Early and Pro (2 copies each)" in (
        conflict.reason
    )


# --- one object never stops the sync ---------------------------------------------------------


def test_overlong_file_name_is_skipped_with_a_reason_and_the_others_land(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    good = good_set(4)
    near_limit = "raw/Pro/" + "b" * 190 + ".jpg"  # 194 bytes: its temporary name must still fit
    too_long = {
        "raw/Benign/" + "a" * 230 + ".jpg": jpeg(11),  # legal for S3 and for the file system
        "raw/Early/" + "é" * 100 + ".jpg": jpeg(12),  # 204 bytes in UTF-8, 104 characters
    }
    put_all(client, bucket, {**good, near_limit: jpeg(13), **too_long})
    aws_env.requests.reset()

    result = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir))

    assert result.failed == []
    assert result.images == len(good) + 1
    assert local_path(images_dir, near_limit).read_bytes() == jpeg(13)
    reasons = {s["key"]: s["reason"] for s in result.skipped}
    assert set(reasons) == set(too_long)
    assert all("file name too long" in r and "at most 200 bytes" in r for r in reasons.values())
    assert gets(aws_env) == len(good) + 1  # the listing alone rejects them: never downloaded
    report = json.loads((images_dir / REPORT_NAME).read_text())
    assert {s["key"] for s in report["skipped"]} == set(too_long)
    assert set(json.loads((images_dir / MANIFEST_NAME).read_text())["images"]) == {
        *good,
        near_limit,
    }


def test_object_over_the_byte_cap_is_skipped_from_the_listing_and_never_downloaded(
    aws_env: S3Server,
    bucket: str,
    client: Any,
    images_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = good_set(4)
    big = jpeg(21, side=160)
    cap = max(len(b) for b in good.values()) + 100
    assert len(big) > cap
    monkeypatch.setenv("LEUKEMIA_MAX_IMAGE_BYTES", str(cap))
    put_all(client, bucket, {**good, "raw/Pro/big.jpg": big})
    aws_env.requests.reset()

    result = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir))

    assert gets(aws_env) == len(good)
    assert result.images == len(good) and result.failed == []
    assert [s["key"] for s in result.skipped] == ["raw/Pro/big.jpg"]
    reason = result.skipped[0]["reason"]
    assert f"too large: {len(big):,} bytes, over the cap of {cap:,}" in reason
    assert "LEUKEMIA_MAX_IMAGE_BYTES" in reason
    assert not (images_dir / "quarantine").exists()


def test_image_over_the_pixel_cap_is_rejected_from_its_header_and_never_decoded(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    from PIL import ImageFile

    real = jpeg(7, side=96)
    huge = bytearray(real)  # the header claims 9500 x 9500: Pillow only warns about that size
    sof = huge.find(b"\xff\xc0")
    huge[sof + 5 : sof + 9] = (9500).to_bytes(2, "big") * 2
    good = good_set(4)
    put_all(client, bucket, {**good, "raw/Pre/huge.jpg": bytes(huge)})
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self: Any) -> Any:
        decoded.append(self.size)
        return real_load(self)

    with mock.patch.object(ImageFile.ImageFile, "load", recording_load):
        result = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir))

    assert result.images == len(good) and result.failed == []
    assert [s["key"] for s in result.skipped] == ["raw/Pre/huge.jpg"]
    assert (
        "image too large: 9500x9500 = 90,250,000 pixels, over the cap of 25,000,000"
        in (result.skipped[0]["reason"])
    )
    assert (9500, 9500) not in decoded and (48, 48) in decoded
    assert (images_dir / "quarantine" / "Pre" / "huge.jpg").read_bytes() == bytes(huge)


def test_pixel_cap_setting_keeps_images_at_the_cap_and_rejects_larger_ones(
    aws_env: S3Server,
    bucket: str,
    client: Any,
    images_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEUKEMIA_MAX_IMAGE_PIXELS", "2_500")
    objects = {"raw/Benign/at-cap.jpg": jpeg(1, side=50), "raw/Early/over.jpg": jpeg(2, side=51)}
    put_all(client, bucket, objects)

    result = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir))

    assert result.images == 1
    assert (
        local_path(images_dir, "raw/Benign/at-cap.jpg").read_bytes()
        == objects["raw/Benign/at-cap.jpg"]
    )
    assert [s["key"] for s in result.skipped] == ["raw/Early/over.jpg"]
    assert "51x51 = 2,601 pixels, over the cap of 2,500" in result.skipped[0]["reason"]


def test_unexpected_error_storing_one_object_is_recorded_as_failed_and_the_rest_land(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    objects = good_set(8)
    put_all(client, bucket, objects)
    broken = "raw/Pre/img-002.jpg"
    real_write = storage._write_temp

    def disk_full_for_one(path: Path, data: Iterable[bytes]) -> Path:
        if path.name == "img-002.jpg":
            raise OSError(28, "No space left on device", str(path))
        return real_write(path, data)

    with mock.patch.object(storage, "_write_temp", disk_full_for_one):
        result = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir), workers=4)

    assert [f["key"] for f in result.failed] == [broken]
    assert "No space left on device" in result.failed[0]["reason"]
    assert result.stored == result.images == len(objects) - 1
    for key, body in objects.items():
        if key != broken:
            assert local_path(images_dir, key).read_bytes() == body
    manifest = json.loads((images_dir / MANIFEST_NAME).read_text())
    assert set(manifest["images"]) == set(objects) - {broken}
    report = json.loads((images_dir / REPORT_NAME).read_text())
    assert [f["key"] for f in report["failed"]] == [broken]
    assert list(images_dir.rglob("*.part")) == []

    again = sync_images(StorageConfig(bucket=bucket, local_dir=images_dir))

    assert again.failed == [] and again.images == len(objects)


# --- retries ----------------------------------------------------------------------------------


def test_sync_gets_every_image_through_503_slowdown_and_500_answers(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = good_set(6)
    put_all(client, bucket, objects)
    with FlakyS3Server(failures=2) as flaky:  # shares moto's backend with the session server
        monkeypatch.setenv("AIRFLOW_CONN_AWS_FLAKY", aws_connection_json(flaky.endpoint_url))
        result = sync_images(
            StorageConfig(bucket=bucket, conn_id="aws_flaky", local_dir=images_dir)
        )

    assert result.failed == [] and result.images == len(objects)
    for key, body in objects.items():
        assert local_path(images_dir, key).read_bytes() == body
    # botocore's own retries did it: two failed answers and one good one for every object.
    assert sorted(flaky.gets.values()) == [3] * len(objects)


def test_object_that_keeps_failing_is_reported_and_the_others_still_land(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = good_set(6)
    put_all(client, bucket, objects)
    broken_key = "raw/Pre/img-002.jpg"
    cfg = StorageConfig(bucket=bucket, conn_id="aws_flaky", local_dir=images_dir)
    with FlakyS3Server(failures=10**6, only={broken_key}) as broken:
        monkeypatch.setenv("AIRFLOW_CONN_AWS_FLAKY", aws_connection_json(broken.endpoint_url))
        result = sync_images(cfg, client=s3_client("aws_flaky", max_attempts=1), attempts=1)

    assert [f["key"] for f in result.failed] == [broken_key]
    assert "download failed" in result.failed[0]["reason"]
    assert result.stored == result.images == len(objects) - 1
    assert not local_path(images_dir, broken_key).exists()

    monkeypatch.setenv("AIRFLOW_CONN_AWS_FLAKY", aws_connection_json(aws_env.endpoint_url))
    aws_env.requests.reset()
    recovered = sync_images(cfg)

    assert gets(aws_env) == 1  # only the one that failed
    assert recovered.failed == [] and recovered.images == len(objects)
    assert local_path(images_dir, broken_key).read_bytes() == objects[broken_key]


# --- two syncs into one folder ----------------------------------------------------------------


class Gated:
    """A client whose GET of `key` waits until the test opens the gate: a sync caught mid-way."""

    def __init__(self, client: Any, key: str) -> None:
        self._client, self.key = client, key
        self.entered, self.gate = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_object(self, **kwargs: Any) -> Any:
        if kwargs["Key"] == self.key:
            self.entered.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return self._client.get_object(**kwargs)


def start_gated_sync(cfg: StorageConfig, client: Any, key: str) -> tuple[Gated, Any]:
    """Start a sync in a thread and return once it is inside the GET of `key`."""
    from concurrent.futures import ThreadPoolExecutor

    gated = Gated(client, key)
    pool = ThreadPoolExecutor(1)
    future = pool.submit(sync_images, cfg, client=gated, workers=2)
    pool.shutdown(wait=False)
    assert gated.entered.wait(30), "the first sync never reached its download"
    return gated, future


def test_second_sync_into_the_same_folder_gives_up_with_a_clear_error_and_deletes_nothing(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    objects = good_set(6)
    put_all(client, bucket, objects)
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)
    first, running = start_gated_sync(cfg, client, "raw/Pre/img-002.jpg")
    live_part = images_dir / "Pro" / ".0123456789abcdef.part"  # as the first sync writes one
    live_part.parent.mkdir(parents=True, exist_ok=True)
    live_part.write_bytes(b"half an image")

    try:
        with pytest.raises(storage.SyncLocked) as caught:
            sync_images(cfg, lock_wait_s=0.5)
    finally:
        first.gate.set()
    result = running.result(timeout=60)

    message = str(caught.value)
    assert f"another sync is writing to {images_dir} (pid {os.getpid()}" in message
    assert "wait for it to finish" in message
    assert live_part.read_bytes() == b"half an image"  # the second sync deleted nothing
    assert result.failed == [] and result.images == len(objects)
    for key, body in objects.items():
        assert local_path(images_dir, key).read_bytes() == body


def test_second_sync_waits_for_the_first_and_then_has_nothing_to_fetch(
    aws_env: S3Server, bucket: str, client: Any, images_dir: Path
) -> None:
    objects = good_set(6)
    put_all(client, bucket, objects)
    cfg = StorageConfig(bucket=bucket, local_dir=images_dir)
    first, running = start_gated_sync(cfg, client, "raw/Pre/img-002.jpg")
    threading.Timer(1.0, first.gate.set).start()

    second = sync_images(cfg, lock_wait_s=60)

    first_result = running.result(timeout=60)
    assert first_result.images == len(objects)
    # It ran after the first had finished: everything was already there.
    assert (second.unchanged, second.downloaded, second.images) == (len(objects), 0, len(objects))
    assert second.digest == first_result.digest


# --- the DAG's sync step ----------------------------------------------------------------------


def test_dag_sync_step_fails_on_a_partial_sync_unless_that_share_of_failures_is_allowed(
    aws_env: S3Server,
    bucket: str,
    client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from leukemia.tasks.training_dag import sync

    objects = good_set(8)
    broken = "raw/Pre/img-002.jpg"
    put_all(client, bucket, {**objects, "raw/Pro/notes.jpg": b"patient notes, not an image"})
    monkeypatch.setenv("LEUKEMIA_DATA_DIR", str(tmp_path / "data"))
    report = f"s3://aws_denied@{bucket}/work/sync/{bucket}/raw/{REPORT_NAME}"
    denied = ForbiddingS3Server(lambda method, target: target == f"{bucket}/{broken}")
    with denied:
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DENIED", aws_connection_json(denied.endpoint_url))
        with pytest.raises(storage.SyncIncomplete) as caught:
            sync(bucket, conn_id="aws_denied")
        allowed = sync(bucket, conn_id="aws_denied", max_failed_fraction=0.2)

    message = str(caught.value)
    assert "1 of 9 objects failed (11.1%, more than the 0.0% allowed)" in message
    assert f"{broken}: download failed" in message and str(report) in message
    assert (allowed["failed"], allowed["skipped"], allowed["images"]) == (1, 1, 7)
    # A bad image is skipped, not failed: it never stops the DAG.
    complete = sync(bucket)
    assert (complete["failed"], complete["skipped"], complete["images"]) == (0, 1, 8)
    assert complete["manifest_uri"] == f"s3://{bucket}/work/sync/{bucket}/raw/{MANIFEST_NAME}"
    assert complete["images_uri"] == f"s3://{bucket}/raw/"


def test_dag_sync_step_on_a_fresh_worker_starts_from_the_work_store_and_only_lists(
    aws_env: S3Server,
    bucket: str,
    client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from leukemia.tasks.training_dag import sync

    put_all(client, bucket, good_set(8))
    monkeypatch.setenv("LEUKEMIA_DATA_DIR", str(tmp_path / "worker-1"))
    first = sync(bucket)
    monkeypatch.setenv("LEUKEMIA_DATA_DIR", str(tmp_path / "worker-2"))
    aws_env.requests.reset()

    again = sync(bucket)

    assert (again["downloaded"], again["unchanged"], again["digest"]) == (0, 8, first["digest"])
    # one listing of raw/, and the work store's manifest read and written back with the report
    assert aws_env.requests.counts == {"LIST": 1, "GET": 1, "PUT": 2}
    assert not list((tmp_path / "worker-2" / "images").glob("*/*.jpg"))
    assert not [v for v in again.values() if isinstance(v, str) and str(tmp_path) in v]


def test_dag_sync_step_refuses_a_work_store_inside_the_images_prefix(
    aws_env: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from leukemia.tasks.training_dag import sync

    monkeypatch.setenv("LEUKEMIA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LEUKEMIA_WORK_URI", f"s3://{bucket}/raw/work/")
    with pytest.raises(ValueError, match="lies inside the images prefix"):
        sync(bucket)


def test_max_failed_fraction_must_be_a_share() -> None:
    with pytest.raises(ValueError, match="max_failed_fraction must be between 0 and 1, got 5"):
        SyncResult(listed=4).require_complete(5)


# --- dataset digest ---------------------------------------------------------------------------


def test_dataset_digest_ignores_order_and_changes_with_any_image() -> None:
    entries = [(CLASSES[i % 4], hashlib.sha256(jpeg(i)).hexdigest()) for i in range(12)]
    shuffled = entries[:]
    random.Random(1).shuffle(shuffled)
    digest = dataset_digest(entries)

    assert dataset_digest(shuffled) == dataset_digest(iter(reversed(entries))) == digest
    one_changed = [
        *entries[:5],
        (entries[5][0], hashlib.sha256(jpeg(99)).hexdigest()),
        *entries[6:],
    ]
    assert dataset_digest(one_changed) != digest
    relabelled = [
        *entries[:5],
        ("Pro" if entries[5][0] != "Pro" else "Pre", entries[5][1]),
        *entries[6:],
    ]
    assert dataset_digest(relabelled) != digest
    assert dataset_digest(entries[:-1]) != digest


# --- upload -----------------------------------------------------------------------------------


def test_upload_folder_puts_every_image_under_its_class_and_sync_gets_them_back(
    aws_env: S3Server, smear_dir: Path, client: Any, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    shutil.copytree(smear_dir, source)
    (source / "Early").rename(source / "early")  # folder case does not matter
    (source / "Unknown").mkdir()
    (source / "Unknown" / "x.jpg").write_bytes(jpeg(1))  # not a class: ignored
    (source / "Pre" / "notes.txt").write_text("ignored")
    expected = {
        f"raw/{label}/{path.name}": path.read_bytes() for label, path in iter_image_files(source)
    }
    bucket = "upload-test-bucket"  # does not exist yet: upload_folder creates it

    count = upload_folder(source, bucket, prefix="raw")

    assert count == len(expected) == sum(1 for _ in smear_dir.rglob("*.jpg"))
    assert {k: (e, n) for k, (e, n, _, _) in s3_state(client, bucket).items()} == {
        k: (f'"{hashlib.md5(b).hexdigest()}"', len(b)) for k, b in expected.items()
    }
    result = sync_images(StorageConfig(bucket=bucket, local_dir=tmp_path / "synced"))
    assert result.images == count
    assert result.digest == dataset_digest(
        (label, hashlib.sha256(path.read_bytes()).hexdigest())
        for label, path in iter_image_files(source)
    )


def test_upload_folder_without_images_says_what_layout_it_expects(
    aws_env: S3Server, tmp_path: Path
) -> None:
    (tmp_path / "Benign").mkdir()
    (tmp_path / "Benign" / "notes.txt").write_text("not an image")
    (tmp_path / "flat.jpg").write_bytes(jpeg(1))  # not inside a class folder

    with pytest.raises(
        ValueError, match=r"no images under .*<Benign\|Early\|Pre\|Pro>/<name>\.jpg"
    ):
        upload_folder(tmp_path, "never-created-bucket")


def test_upload_folder_says_access_denied_instead_of_creating_the_bucket(
    aws_env: S3Server, smear_dir: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = "someone-elses-bucket"
    denied = ForbiddingS3Server(lambda method, target: method == "HEAD" and target == bucket)
    with denied:
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DENIED", aws_connection_json(denied.endpoint_url))
        with pytest.raises(RuntimeError) as caught:
            upload_folder(smear_dir, bucket, conn_id="aws_denied")

    message = str(caught.value)
    assert f"access denied to bucket {bucket} through connection 'aws_denied'" in message
    assert "nothing was uploaded" in message
    assert bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}


def test_upload_folder_says_s3_cannot_be_reached_instead_of_creating_the_bucket(
    aws_env: S3Server, smear_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DOWN", aws_connection_json(closed))
    one_try = storage.s3_client
    monkeypatch.setattr(
        storage, "s3_client", lambda conn_id, workers=16: one_try(conn_id, workers, max_attempts=1)
    )

    with pytest.raises(
        RuntimeError,
        match=r"cannot reach S3 to check bucket b1 through connection 'aws_down'.*endpoint_url",
    ):
        upload_folder(smear_dir, "b1", conn_id="aws_down")


def test_sync_result_summary_is_small_enough_for_xcom() -> None:
    result = SyncResult(skipped=[{"key": "a", "reason": "b"}] * 500)
    summary = result.summary()
    assert summary["skipped"] == 500 and isinstance(summary["failed"], int)
    assert len(json.dumps(summary)) < 1000
