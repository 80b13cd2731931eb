"""Objects at a location: an `s3://[conn_id@]bucket/prefix/` URI or a local folder (`file://` or a path).

Tasks hand things to each other through the work store (`config.work_uri`, `LEUKEMIA_WORK_URI`): the
sync manifest, the split, the feature shards, the grid report. S3 goes through the Amazon provider's
`S3Hook`, so the Airflow connection decides credentials and endpoint; the connection id rides in the
URI the way Airflow's `ObjectStoragePath` writes it (`s3://my_conn@bucket/key`; none: the
`LEUKEMIA_AWS_CONN_ID` setting). `ObjectStoragePath` itself needs `s3fs`, which the lock does not
carry; the hook does the same job with the client the sync already uses.

Reads can be ranged (`Store.open` returns a seekable file), so a reader takes one array out of a
shard file without fetching the rest. Writes are atomic: one PUT on S3, a rename on a local disk.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from leukemia.config import env

log = logging.getLogger(__name__)

S3 = "s3://"
FILE = "file://"
#: Threads that fetch objects at once (the S3 client's pool is sized to match).
READ_WORKERS = 16


#: The environment variables boto3 falls back to when a connection does not name them.
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
_CLIENTS: dict[tuple[int, str, int, int, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def s3_client(conn_id: str, workers: int = 16, max_attempts: int = 8) -> Any:
    """A boto3 S3 client from the Airflow connection, with retries and a pool sized for `workers`.

    botocore's `standard` retry mode retries throttling and 5xx answers with exponential backoff
    and jitter; the pool must be at least as large as the thread count. Clients are kept per
    process and reused while the connection (and the AWS environment it falls back to) stays the
    same: building one loads botocore's service model, about 0.3 s of CPU each time, and a task
    opens many stores. boto3 clients are thread-safe.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.config import Config

    hook = S3Hook(aws_conn_id=conn_id)
    # the process id: a forked child (Airflow's task runner, a Celery worker) builds its own
    key = (os.getpid(), conn_id, workers, max_attempts, _connection_fingerprint(hook))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            config = Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                max_pool_connections=max(10, workers),
            )
            _CLIENTS[key] = hook.get_client_type(config=config)
        return _CLIENTS[key]


def _connection_fingerprint(hook: Any) -> str:
    """A digest of what decides the client: the connection's fields and the AWS environment."""
    import hashlib
    import json

    wrapper = hook.conn_config
    fields = {
        "conn": [wrapper.conn_type, wrapper.login, wrapper.password, wrapper.schema],
        "extra": wrapper.extra_config,
        "region": wrapper.region_name,
        "verify": str(wrapper.verify),
        "env": [os.environ.get(name) for name in _AWS_ENV],
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def is_remote(location: str | Path) -> bool:
    """True for `s3://` locations."""
    return str(location).startswith(S3)


def join(location: str | Path, *parts: str) -> str:
    """`location` with `parts` appended, as a URI for URIs and a path for paths."""
    text = str(location)
    if not text.startswith((S3, FILE)):
        return str(Path(text).joinpath(*parts))
    for part in parts:
        text = f"{text.rstrip('/')}/{part.lstrip('/')}" if part else text
    return text


def with_conn(uri: str, conn_id: str | None) -> str:
    """`s3://bucket/key` as `s3://conn_id@bucket/key` when `conn_id` is not the default one."""
    if not uri.startswith(S3) or not conn_id or conn_id == env("LEUKEMIA_AWS_CONN_ID"):
        return uri
    rest = uri.removeprefix(S3)
    if "@" in rest.split("/", 1)[0]:
        return uri
    return f"{S3}{conn_id}@{rest}"


def inside(location: str | Path, folder: str | Path) -> bool:
    """True when `location` lies in `folder` (same bucket and key prefix; connection ids aside)."""
    a, b = str(location), str(folder)
    if is_remote(a) != is_remote(b):
        return False
    if not is_remote(a):
        return Path(a).absolute().is_relative_to(Path(b).absolute())
    inner, outer = urlsplit(a), urlsplit(b)
    if inner.netloc.rpartition("@")[2] != outer.netloc.rpartition("@")[2]:
        return False
    prefix = outer.path.strip("/")
    return not prefix or f"{inner.path.strip('/')}/".startswith(prefix + "/")


class Store:
    """A folder of objects. Names below it are `/`-separated and relative to it."""

    #: Bytes read through this store (and the files it opened); for the tests and the benchmarks.
    bytes_read: int

    def __init__(self) -> None:
        self.bytes_read = 0
        self._lock = threading.Lock()

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def uri(self, name: str = "") -> str:
        """The location of `name` (of the store itself when empty)."""
        raise NotImplementedError

    def child(self, name: str) -> Store:
        """The store of the folder `name` below this one."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write the object whole (readers never see part of it); return its location."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, folder: str = "") -> dict[str, int]:
        """Name → size of every object below `folder`, names relative to `folder`."""
        raise NotImplementedError

    def open(self, name: str, size: int | None = None) -> BinaryIO:
        """A seekable, read-only file of the object; on S3 each read fetches only its byte range."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri()!r})"


class LocalStore(Store):
    """A folder on this machine's disk."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(root).expanduser().absolute()

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def uri(self, name: str = "") -> str:
        return str(self._path(name))

    def child(self, name: str) -> LocalStore:
        return LocalStore(self._path(name))

    def read_bytes(self, name: str) -> bytes:
        data = self._path(name).read_bytes()
        self._count(len(data))
        return data

    def write_bytes(self, name: str, data: bytes) -> str:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return str(path)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, folder: str = "") -> dict[str, int]:
        base = self._path(folder)
        if not base.is_dir():
            return {}
        out = {}
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base).as_posix()
            if path.is_file() and not any(p.startswith(".") for p in rel.split("/")):
                out[rel] = path.stat().st_size
        return out

    def open(self, name: str, size: int | None = None) -> BinaryIO:
        raw = _CountingRaw(io.FileIO(self._path(name), "r"), self._count)
        return io.BufferedReader(raw, buffer_size=1 << 16)  # type: ignore[return-value]


class S3Store(Store):
    """A prefix of an S3 bucket, through the S3 hook of connection `conn_id`."""

    def __init__(
        self, bucket: str, prefix: str = "", conn_id: str | None = None, client: Any = None
    ) -> None:
        super().__init__()
        if not bucket:
            raise ValueError("an s3:// location needs a bucket: s3://<bucket>/<prefix>/")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.conn_id = conn_id or env("LEUKEMIA_AWS_CONN_ID")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self.conn_id, workers=READ_WORKERS)
        return self._client

    def key(self, name: str) -> str:
        return self.prefix + name

    def uri(self, name: str = "") -> str:
        return with_conn(f"{S3}{self.bucket}/{self.key(name)}", self.conn_id)

    def child(self, name: str) -> S3Store:
        return S3Store(self.bucket, self.key(name), self.conn_id, self._client)

    def _error(self, exc: Exception, name: str, doing: str) -> Exception:
        """FileNotFoundError for a missing key; otherwise a one-line error that says what to check."""
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return FileNotFoundError(f"no object at {self.uri(name)}")
        return RuntimeError(
            f"cannot {doing} {self.uri(name)} through connection {self.conn_id!r}: {exc}. Check "
            "that the bucket exists and the connection's credentials and endpoint_url"
        )

    def read_bytes(self, name: str) -> bytes:
        return self._get(name)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes `start` to `end` (inclusive) of the object: one ranged GET."""
        return self._get(name, Range=f"bytes={start}-{end}")

    def _get(self, name: str, **extra: str) -> bytes:
        """One GET of the object (whole, or the `Range` in `extra`), counted."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name), **extra)["Body"]
            with body:
                data = body.read()
        except Exception as exc:
            raise self._error(exc, name, "read") from exc
        self._count(len(data))
        return data

    def write_bytes(self, name: str, data: bytes) -> str:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)
        except Exception as exc:
            raise self._error(exc, name, "write") from exc
        return self.uri(name)

    def exists(self, name: str) -> bool:
        return self._size(name) is not None

    def _size(self, name: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as exc:
            error = self._error(exc, name, "look up")
            if isinstance(error, FileNotFoundError):
                return None
            raise error from exc
        return int(head["ContentLength"])

    def list(self, folder: str = "") -> dict[str, int]:
        prefix = self.key(folder.strip("/") + "/" if folder.strip("/") else "")
        out: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        out[obj["Key"][len(prefix) :]] = int(obj["Size"])
        except Exception as exc:
            raise self._error(exc, folder, "list") from exc
        return out

    def open(self, name: str, size: int | None = None) -> BinaryIO:
        if size is None:
            size = self._size(name)
            if size is None:
                raise FileNotFoundError(f"no object at {self.uri(name)}")
        return io.BufferedReader(_S3Range(self, name, size), buffer_size=1 << 16)  # type: ignore[return-value]


class _S3Range(io.RawIOBase):
    """A read-only, seekable view of one S3 object: each read is one ranged GET."""

    def __init__(self, store: S3Store, name: str, size: int) -> None:
        super().__init__()
        self._store, self._name, self._size, self._pos = store, name, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or not len(view):
            return 0
        end = min(self._pos + len(view), self._size) - 1
        data = self._store.read_range(self._name, self._pos, end)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _CountingRaw(io.RawIOBase):
    """A local file (unbuffered) that adds what is read from it to its store's count."""

    def __init__(self, raw: io.FileIO, count: Any) -> None:
        super().__init__()
        self._raw, self._counter = raw, count

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer) or 0
        self._counter(n)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_store(location: str | Path, conn_id: str | None = None) -> Store:
    """The store at `location`: `s3://[conn_id@]bucket/prefix`, `file:///folder` or a folder path.

    `conn_id` is used for an `s3://` location that names none (default: LEUKEMIA_AWS_CONN_ID).
    """
    text = str(location)
    if text.startswith(S3):
        parts = urlsplit(text)
        userinfo, _, bucket = parts.netloc.rpartition("@")
        return S3Store(bucket, unquote(parts.path), userinfo or conn_id)
    if text.startswith(FILE):
        return LocalStore(unquote(urlsplit(text).path))
    if "://" in text:
        raise ValueError(
            f"unsupported location {text!r}: use s3://<bucket>/<prefix>/, file:///<folder> "
            "or a folder path"
        )
    return LocalStore(text)


def split_location(location: str | Path) -> tuple[str, str]:
    """(folder, name) of an object's location: the folder's location and the last name."""
    text = str(location).rstrip("/")
    if text.startswith((S3, FILE)):
        folder, _, name = text.rpartition("/")
        return folder + "/", name
    path = Path(text)
    return str(path.parent), path.name


def read_location(location: str | Path) -> bytes:
    """The bytes of one object given by its full location."""
    folder, name = split_location(location)
    return open_store(folder).read_bytes(name)


def write_location(location: str | Path, data: bytes) -> str:
    """Write one object given by its full location; return the location."""
    folder, name = split_location(location)
    return open_store(folder).write_bytes(name, data)


def read_all(locations: Sequence[str | Path], workers: int = READ_WORKERS) -> list[bytes]:
    """The bytes of objects anywhere (S3 keys and local files mixed), in the order given.

    Objects of one bucket share one client and are fetched `workers` at a time.
    """
    stores: dict[str, Store] = {}
    jobs: list[tuple[Store, str]] = []
    for location in locations:
        text = str(location)
        if text.startswith(S3):
            parts = urlsplit(text)
            root = f"{S3}{parts.netloc}/"
            if root not in stores:
                stores[root] = open_store(root)
            jobs.append((stores[root], unquote(parts.path).lstrip("/")))
        else:
            folder, name = split_location(text)
            jobs.append((LocalStore(folder), name))
    if len(jobs) <= 1 or workers <= 1:
        return [store.read_bytes(name) for store, name in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: job[0].read_bytes(job[1]), jobs))
