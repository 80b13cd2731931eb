"""Benchmark: `sync_images` against the reference one-key-at-a-time `download_file` loop.

Starts moto's S3 server on loopback with a per-request delay standing in for a real S3 round trip,
uploads N distinct, valid JPEGs of about --size-kb under `raw/<Class>/`, then measures in one run:

(a) the reference: boto3 `client.download_file(bucket, key, path)` for one key after another, timed
    on the first --reference-sample keys and extrapolated linearly to N;
(b) `sync_images` first sync of all N objects;
(c) `sync_images` no-op resync (must make listing requests only, no GET of objects);
(d) for scale: bare `get_object` + read on the same number of threads, nothing checked or written,
    the most any downloader built on boto3 gets out of this server and machine.

By default the server runs in its own process, as real S3 never shares the client's interpreter;
`--server thread` runs it in a thread of this process instead, where the client's botocore threads
and moto's handler threads compete for one GIL. `--keep-alive` lets moto keep connections open
as S3 does. The exit status is 1 when the sync misbehaves (not all stored, a no-op resync that
downloads or GETs); the speed target depends on the machine and is reported, not enforced.
Results and analysis: bench/RESULTS.md, "## S3 sync (bench/s3_sync.py)".

    python bench/s3_sync.py --objects 3000 --size-kb 25 --delay-ms 20 --workers 16

`--scale` measures instead how the sync grows with the bucket (issue 26), at 10,000, 30,000 and
100,000 small objects (about 1.5 KB) put straight into moto's backend, with the same delay per
request; the server always runs in its own process and lists from a sorted index of the keys,
since moto's own listing scans and sorts the whole bucket for every page (it prints both costs).
For each size, in a fresh process each: the first sync and the no-op resync, with wall time,
peak RSS, bytes the collecting thread wrote to the manifest state (checkpoints) and to
`sync_manifest.json` (once); then a first sync of the largest size killed by SIGKILL half-way,
resumed, and compared file by file and byte by byte with the clean sync; then the checkpoints
alone, every 100 entries, as the whole JSON rewrite they were before and as the SQLite state they
are now (`--old-max` caps the sizes at which the old one runs: it writes n^2/200 entries).
Targets, reported: time per object and peak RSS within 20 % from the smallest size to the largest,
the no-op resync of the largest under 30 s. A wrong result exits 1.

    python bench/s3_sync.py --scale 10000,30000,100000 --delay-ms 20 --workers 16
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

BUCKET = "bench-s3-sync"
PREFIX = "raw/"
TARGET_SPEEDUP = 10.0
SCALE_SIZES = "10000,30000,100000"
SCALE_FLAT = 0.20  # time per object and peak RSS within 20 % from the smallest size to the largest
SCALE_NOOP_S = 30.0  # the no-op resync of the largest size


def _keep_alive() -> None:
    """Let moto's werkzeug handler keep connections open (HTTP/1.1), as S3 does; it speaks HTTP/1.0,
    which costs every request a new TCP connection and a new server thread."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    MotoRequestHandler.protocol_version = "HTTP/1.1"


def _sorted_listing() -> None:
    """Let moto list a page from a sorted index of the bucket's keys, as S3 does.

    moto lists by scanning and sorting the whole bucket for every page: 0.3 s a page at 100,000
    objects, 30 s for one listing, O(n^2) in all, which would time the server instead of the sync.
    """
    from moto.s3.models import FakeDeleteMarker, S3Backend

    original = S3Backend.list_objects_v2
    index: dict[str, tuple[int, list[str]]] = {}

    def list_objects_v2(
        self: Any, bucket: Any, prefix: str | None, delimiter: str | None,
        continuation_token: str | None, start_after: str | None, max_keys: int,
    ) -> Any:  # fmt: skip
        token = continuation_token
        if delimiter:
            return original(self, bucket, prefix, delimiter, token, start_after, max_keys)
        count, names = index.get(bucket.name, (-1, []))
        if count != len(bucket.keys):  # the bench only adds objects, so the count tells a change
            names = sorted(bucket.keys)
            index[bucket.name] = (len(names), names)
        prefix = prefix or ""
        after = self._pagination_tokens.get(token) if token else start_after
        start = max(bisect.bisect_left(names, prefix), bisect.bisect_right(names, after or ""))
        page: list[Any] = []
        for name in itertools.islice(names, start, None):
            if not name.startswith(prefix) or len(page) > max_keys:
                break
            if not isinstance(key := bucket.keys[name], FakeDeleteMarker):
                page.append(key)
        return self._truncate_result(page, max_keys)

    S3Backend.list_objects_v2 = list_objects_v2
    S3Backend.list_objects_v2_moto = original


def _backend() -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def _fill(bucket: str, bases: list[bytes], n: int) -> int:
    """Create `bucket` holding n distinct small JPEGs, straight into moto's backend (no HTTP):
    uploading 100,000 objects over HTTP would take longer than syncing them. Their bytes in all."""
    from leukemia.config import CLASSES

    backend, total = _backend(), 0
    backend.create_bucket(bucket, "us-east-1")
    for i in range(n):
        body = distinct_jpeg(bases[i % len(bases)], i)
        backend.put_object(bucket, f"{PREFIX}{CLASSES[i % len(CLASSES)]}/img-{i:06d}.jpg", body)
        total += len(body)
    return total


def _listing_cost(bucket: str) -> tuple[float, float]:
    """Seconds for the second 1,000-key page of `bucket`: moto's own listing, the sorted index."""
    backend = _backend()
    fake = backend.get_bucket(bucket)
    seconds = []
    for method in (backend.list_objects_v2_moto, backend.list_objects_v2):
        _, _, token = method(fake, PREFIX, None, None, None, 1000)
        started = time.perf_counter()
        method(fake, PREFIX, None, token, None, 1000)
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1]


def _serve(conn: Any, delay_s: float, keep_alive: bool, scale: bool = False) -> None:
    """Child process: one server without delay (for the upload) and one with it, same backend."""
    logging.disable(logging.INFO)
    from leukemia.dev.embedded import S3Server

    if keep_alive:
        _keep_alive()
    if scale:
        _sorted_listing()
    upload, timed = S3Server().start(), S3Server(delay_s=delay_s).start()
    conn.send((upload.endpoint_url, timed.endpoint_url))
    while True:
        command = conn.recv()
        if command == "counts":
            conn.send(dict(timed.requests.counts))
        elif command == "reset":
            timed.requests.reset()
            conn.send(None)
        elif command == "cpu":
            conn.send(_cpu_seconds())
        elif isinstance(command, tuple) and command[0] == "fill":
            conn.send(_fill(*command[1:]))
        elif isinstance(command, tuple) and command[0] == "listing-cost":
            conn.send(_listing_cost(*command[1:]))
        else:
            upload.stop()
            timed.stop()
            conn.send(None)
            return


@dataclass
class Servers:
    """The two endpoints (upload without delay, timed with it) and the timed one's request counter."""

    upload_url: str
    url: str
    counts: Callable[[], dict[str, int]]
    reset: Callable[[], None]
    stop: Callable[[], None]
    ask: Callable[[Any], Any] | None = None  # a command for the server's process (--scale)


def start_servers(mode: str, delay_s: float, keep_alive: bool, scale: bool = False) -> Servers:
    """moto's S3 server twice on loopback; both share moto's in-memory backend."""
    if mode == "thread" and not scale:
        from leukemia.dev.embedded import S3Server

        if keep_alive:
            _keep_alive()
        upload, timed = S3Server().start(), S3Server(delay_s=delay_s).start()

        def stop() -> None:
            upload.stop()
            timed.stop()

        return Servers(
            upload.endpoint_url,
            timed.endpoint_url,
            lambda: dict(timed.requests.counts),
            timed.requests.reset,
            stop,
        )

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, delay_s, keep_alive, scale), daemon=True)
    proc.start()
    upload_url, url = parent.recv()

    def ask(command: str) -> Any:
        parent.send(command)
        return parent.recv()

    def stop() -> None:
        ask("stop")
        proc.join(timeout=10)

    return Servers(upload_url, url, lambda: ask("counts"), lambda: ask("reset"), stop, ask)


def jpeg_bases(size_kb: float, count: int = 8, seed: int = 0) -> list[bytes]:
    """`count` noise JPEGs of about `size_kb` each (noise barely compresses, so size ~ side^2)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    target = int(size_kb * 1024)

    def encode(side: int) -> bytes:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    side = 32
    while len(encode(side)) < target:
        side += 8
    return [encode(side) for _ in range(count)]


def distinct_jpeg(base: bytes, index: int) -> bytes:
    """`base` with a comment segment naming `index` after SOI: still a valid JPEG, distinct bytes."""
    comment = f"bench object {index}".encode()
    return base[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + base[2:]


def fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


@dataclass
class Row:
    method: str
    objects: int
    seconds: float
    requests: str


def timed(servers: Servers, fn: Callable[[], Any]) -> tuple[Any, float, dict[str, int]]:
    """Run `fn` with the timed server's counter reset: (result, seconds, request counts)."""
    servers.reset()
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started, servers.counts()


def quiet_logs() -> None:
    """Keep INFO lines (one per S3 hook) out of the table; Airflow reads this when first imported."""
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=3000, help="objects in the bucket")
    parser.add_argument("--size-kb", type=float, default=25, help="approximate object size")
    parser.add_argument("--delay-ms", type=float, default=20, help="server delay per request")
    parser.add_argument("--workers", type=int, default=16, help="sync_images download threads")
    parser.add_argument(
        "--reference-sample",
        type=int,
        default=300,
        help="keys timed for the reference loop (extrapolated linearly to --objects)",
    )
    parser.add_argument(
        "--server",
        choices=("process", "thread"),
        default="process",
        help="run moto in its own process (like real S3) or in a thread of this one",
    )
    parser.add_argument(
        "--keep-alive",
        action="store_true",
        help="let the server keep connections open (HTTP/1.1) as S3 does; moto uses HTTP/1.0",
    )
    parser.add_argument(
        "--scale",
        nargs="?",
        const=SCALE_SIZES,
        help=f"instead: the scale case at these bucket sizes (default {SCALE_SIZES})",
    )
    parser.add_argument(
        "--scale-size-kb", type=float, default=1, help="--scale: approximate object size"
    )
    parser.add_argument(
        "--old-max",
        type=int,
        default=30000,
        help="--scale: largest size at which to time the old whole-manifest checkpoints",
    )
    args = parser.parse_args(argv)
    quiet_logs()
    if args.scale:
        return scale(args)

    from leukemia.config import CLASSES, StorageConfig
    from leukemia.dev.embedded import aws_connection_json
    from leukemia.storage import s3_client, sync_images

    n = args.objects
    servers = start_servers(args.server, args.delay_ms / 1000, args.keep_alive)
    workdir = Path(tempfile.mkdtemp(prefix="bench-s3-sync-"))
    try:
        os.environ["AIRFLOW_CONN_BENCH_UPLOAD"] = aws_connection_json(servers.upload_url)
        os.environ["AIRFLOW_CONN_BENCH_S3"] = aws_connection_json(servers.url)

        bases = jpeg_bases(args.size_kb)
        uploader = s3_client("bench_upload", workers=16)
        uploader.create_bucket(Bucket=BUCKET)
        keys = [f"{PREFIX}{CLASSES[i % len(CLASSES)]}/img-{i:06d}.jpg" for i in range(n)]

        def put(i: int) -> int:
            body = distinct_jpeg(bases[i % len(bases)], i)
            uploader.put_object(Bucket=BUCKET, Key=keys[i], Body=body)
            return len(body)

        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            total_bytes = sum(pool.map(put, range(n)))
        print(
            f"uploaded {n} objects of {total_bytes / n / 1024:.1f} KB on average in "
            f"{time.perf_counter() - started:.1f}s (no delay); server in a {args.server}, "
            f"{'HTTP/1.1 keep-alive' if args.keep_alive else 'HTTP/1.0 (moto default)'}, "
            f"{args.delay_ms:g} ms delay per request",
            flush=True,
        )

        # (a) the reference: one download_file after another, timed on a sample.
        sample = keys[: min(args.reference_sample, n)]
        reference = s3_client("bench_s3", workers=1)
        ref_dir = workdir / "reference"
        ref_dir.mkdir()

        def reference_loop() -> None:
            for key in sample:
                reference.download_file(BUCKET, key, str(ref_dir / key.replace("/", "_")))

        _, ref_sample_s, ref_counts = timed(servers, reference_loop)
        ref_s = ref_sample_s * n / len(sample)

        # (b) first sync of everything, (c) no-op resync.
        cfg = StorageConfig(
            bucket=BUCKET, prefix=PREFIX, conn_id="bench_s3", local_dir=workdir / "images"
        )
        first, first_s, first_counts = timed(
            servers, lambda: sync_images(cfg, workers=args.workers)
        )
        again, again_s, again_counts = timed(
            servers, lambda: sync_images(cfg, workers=args.workers)
        )

        # (d) for scale: the same threads doing bare GETs, nothing validated or written.
        bare = s3_client("bench_s3", workers=args.workers)

        def bare_gets() -> None:
            def get(key: str) -> None:
                bare.get_object(Bucket=BUCKET, Key=key)["Body"].read()

            with ThreadPoolExecutor(args.workers) as pool:
                list(pool.map(get, keys))

        _, bare_s, bare_counts = timed(servers, bare_gets)
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [
        Row(
            f"(a) reference: `download_file`, one key after another (timed on {len(sample)}, "
            "extrapolated linearly)",
            n,
            ref_s,
            f"{fmt_counts(ref_counts)} for the {len(sample)} timed",
        ),
        Row(
            f"(b) `sync_images` first sync, {args.workers} workers",
            n,
            first_s,
            fmt_counts(first_counts),
        ),
        Row("(c) `sync_images` no-op resync", n, again_s, fmt_counts(again_counts)),
        Row(
            f"(d) for scale: bare `get_object` + read, {args.workers} threads, nothing written",
            n,
            bare_s,
            fmt_counts(bare_counts),
        ),
    ]
    print()
    print("| method | objects | seconds | objects/s | speed-up vs reference | requests |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        print(
            f"| {row.method} | {row.objects} | {row.seconds:.1f} | {row.objects / row.seconds:.0f} "
            f"| {ref_s / row.seconds:.1f}x | {row.requests} |"
        )
    print()

    # What the sync must do wherever it runs: a failure here is a bug (exit status 1).
    checks = {
        f"first sync stored all {n} images": first.stored == n and first.images == n,
        "no-op resync: nothing downloaded, same digest": again.unchanged == n
        and again.downloaded == 0
        and again.digest == first.digest,
        "no-op resync: listing requests only": set(again_counts) == {"LIST"},
    }
    for name, ok in checks.items():
        print(f"{'ok' if ok else 'FAILED'}: {name}")
    # The speed target depends on the machine and its load, so it is reported, not enforced.
    speedup = ref_s / first_s
    print(
        f"target first sync >= {TARGET_SPEEDUP:g}x the reference: "
        f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'} ({speedup:.1f}x; bare GETs "
        f"{ref_s / bare_s:.1f}x)"
    )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{machine()}; Python {platform.python_version()}; load average {load} (1/5/15 min)")
    return 0 if all(checks.values()) else 1


# --- --scale: the sync at 10,000 to 100,000 objects ------------------------------------------


def _thread_bytes_written() -> int:
    """Bytes this thread passed to write() and pwrite() (Linux per-thread I/O accounting): the
    sync's collecting thread writes the manifest; the downloads are written by its pool."""
    with open("/proc/thread-self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("wchar:"))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads: the work done, whatever the load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _DiesAtGet:
    """A client that kills its own process at its n-th `get_object`, at once, whatever the other
    threads are doing: the way an OOM kill or a lost worker ends a sync."""

    def __init__(self, client: Any, n: int) -> None:
        self._client, self._n, self._calls, self._lock = client, n, 0, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_object(self, **kwargs: Any) -> Any:
        with self._lock:
            self._calls += 1
            calls = self._calls
        if calls == self._n:
            os.kill(os.getpid(), signal.SIGKILL)
        return self._client.get_object(**kwargs)


def _sync_child(conn: Any, folder: str, bucket: str, workers: int, kill_at: int) -> None:
    """Child process: one `sync_images` (killed at GET number `kill_at` when not 0), measured
    alone: seconds, peak RSS, bytes written to the manifest state and to `sync_manifest.json`."""
    quiet_logs()
    from leukemia.config import StorageConfig
    from leukemia.storage import MANIFEST_NAME, REPORT_NAME, s3_client, sync_images

    client = s3_client("bench_s3", workers=workers)
    if kill_at:
        client = _DiesAtGet(client, kill_at)
    cfg = StorageConfig(bucket=bucket, prefix=PREFIX, conn_id="bench_s3", local_dir=Path(folder))
    exported = cfg.local_dir / MANIFEST_NAME

    def stamp() -> tuple[int, int] | None:
        return (exported.stat().st_ino, exported.stat().st_mtime_ns) if exported.exists() else None

    before, written, started, cpu = (
        stamp(),
        _thread_bytes_written(),
        time.perf_counter(),
        _cpu_seconds(),
    )
    result = sync_images(cfg, client=client, workers=workers)
    seconds, written = time.perf_counter() - started, _thread_bytes_written() - written
    cpu = _cpu_seconds() - cpu
    json_bytes = exported.stat().st_size if stamp() != before else 0
    state_bytes = written - json_bytes - (cfg.local_dir / REPORT_NAME).stat().st_size
    conn.send(
        {
            "seconds": seconds,
            "cpu": cpu,
            "rss": _peak_rss_mib(),
            "state_bytes": state_bytes,
            "json_bytes": json_bytes,
            "result": result.summary(),
        }
    )


def _entry(i: int) -> tuple[str, dict[str, Any]]:
    """The manifest entry the sync records for bench object number i."""
    from leukemia.config import CLASSES

    label = CLASSES[i % len(CLASSES)]
    return f"{PREFIX}{label}/img-{i:06d}.jpg", {
        "size": 2500 + i % 97,
        "etag": f"{i:032x}",
        "last_modified": "2026-12-03T10:00:00+00:00",
        "path": f"{label}/img-{i:06d}.jpg",
        "label": label,
        "sha256": f"{i:064x}",
    }


def _checkpoint_child(conn: Any, how: str, n: int, every: int, folder: str) -> None:
    """Child process: record n entries in key order (as a first sync does), checkpointing every
    `every`: "rewrite" writes the whole manifest as JSON (before issue 26), "state" commits
    the SQLite state. Seconds, bytes written, peak RSS."""
    from leukemia.manifest_store import ManifestStore
    from leukemia.storage import _atomic_write_bytes

    root = Path(folder)
    root.mkdir(parents=True)
    order = sorted(range(n), key=lambda i: (i % 4, i))
    written, started = _thread_bytes_written(), time.perf_counter()
    if how == "rewrite":
        manifest: dict[str, Any] = {"images": {}, "rejected": {}}
        for done, i in enumerate(order, 1):
            key, entry = _entry(i)
            manifest["images"][key] = entry
            if done % every == 0:
                payload = json.dumps(manifest, sort_keys=True).encode()
                _atomic_write_bytes(root / "sync_manifest.json", payload)
    else:
        with ManifestStore.open(root) as store:
            for done, i in enumerate(order, 1):
                store.put_image(*_entry(i))
                if done % every == 0:
                    store.commit()
    seconds, written = time.perf_counter() - started, _thread_bytes_written() - written
    conn.send({"seconds": seconds, "bytes": written, "rss": _peak_rss_mib()})


def _in_child(target: Callable[..., None], *args: Any) -> tuple[dict[str, Any] | None, int]:
    """Run `target(conn, *args)` in a fresh interpreter: (what it sent or None, exit code)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    child.close()
    try:
        out = parent.recv()
    except EOFError:  # it died before sending
        out = None
    proc.join()
    return out, int(proc.exitcode or 0)


def _class_file_hashes(root: Path) -> dict[str, str]:
    """`<Class>/<name>` -> sha256 of every file in the class folders of `root`."""
    from leukemia.config import CLASSES

    return {
        f"{label}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for label in CLASSES
        if (root / label).is_dir()
        for p in (root / label).iterdir()
    }


@dataclass
class ScaleRow:
    objects: int
    first: dict[str, Any]
    first_requests: dict[str, int]
    noop: dict[str, Any]
    noop_requests: dict[str, int]


def _sync_in_child(
    servers: Servers, folder: Path, bucket: str, workers: int, kill_at: int = 0
) -> tuple[dict[str, Any] | None, int, dict[str, int]]:
    """One sync in its own process: (its measures plus the server's CPU seconds, exit code,
    the requests the server answered)."""
    assert servers.ask is not None
    servers.reset()
    server_cpu = servers.ask("cpu")
    out, code = _in_child(_sync_child, str(folder), bucket, workers, kill_at)
    if out is not None:
        out["server_cpu"] = servers.ask("cpu") - server_cpu
    return out, code, servers.counts()


def _measure_size(servers: Servers, workdir: Path, n: int, workers: int) -> ScaleRow:
    """First sync and no-op resync of the n-object bucket, each in its own process."""
    folder, bucket = workdir / f"sync-{n}", f"bench-scale-{n}"
    first, _, first_requests = _sync_in_child(servers, folder, bucket, workers)
    noop, _, noop_requests = _sync_in_child(servers, folder, bucket, workers)
    if first is None or noop is None:
        raise RuntimeError(f"the sync of {n} objects died; run it alone to see why")
    print(
        f"{n} objects: first sync {first['seconds']:.1f}s ({first['cpu']:.1f} CPU s), no-op "
        f"resync {noop['seconds']:.1f}s; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return ScaleRow(n, first, first_requests, noop, noop_requests)


def _kill_and_resume(servers: Servers, workdir: Path, n: int, workers: int) -> dict[str, Any]:
    """Kill a first sync of n objects half-way (SIGKILL), resume it, compare with the clean one."""
    from leukemia.storage import MANIFEST_NAME, load_manifest

    folder, clean, bucket = workdir / "killed", workdir / f"sync-{n}", f"bench-scale-{n}"
    _, code, _ = _sync_in_child(servers, folder, bucket, workers, kill_at=n // 2)
    recorded = len(load_manifest(folder)["images"])
    resumed, _, requests = _sync_in_child(servers, folder, bucket, workers)
    if resumed is None:
        raise RuntimeError(f"the resumed sync of {n} objects died; run it alone to see why")
    files = _class_file_hashes(folder)
    return {
        "exit": code,
        "recorded": recorded,
        "resumed": resumed,
        "gets": requests.get("GET", 0),
        "files": len(files),
        "same_files": files == _class_file_hashes(clean),
        "same_manifest": (folder / MANIFEST_NAME).read_bytes()
        == (clean / MANIFEST_NAME).read_bytes(),
    }


def _checkpoint_costs(workdir: Path, sizes: list[int], old_max: int) -> list[dict[str, Any]]:
    """Checkpoints alone, every 100 entries: the whole JSON rewrite against the state database."""
    rows = []
    for n in sizes:
        state, _ = _in_child(_checkpoint_child, "state", n, 100, str(workdir / f"state-{n}"))
        old = None
        if n <= old_max:
            old, _ = _in_child(_checkpoint_child, "rewrite", n, 100, str(workdir / f"json-{n}"))
        rows.append({"objects": n, "state": state, "rewrite": old})
    return rows


def _print_scale(rows: list[ScaleRow], costs: list[dict[str, Any]], kill: dict[str, Any]) -> None:
    print()
    print(
        "| objects | first sync s | ms per object | sync CPU ms per object | server CPU ms per "
        "object | peak RSS MiB | state bytes written per object | sync_manifest.json bytes per "
        "object (once) | no-op resync s | no-op peak RSS MiB | requests: first sync "
        "| requests: no-op |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        n, first, noop = r.objects, r.first, r.noop
        print(
            f"| {n} | {first['seconds']:.1f} | {1000 * first['seconds'] / n:.2f} "
            f"| {1000 * first['cpu'] / n:.2f} | {1000 * first['server_cpu'] / n:.2f} "
            f"| {first['rss']:.0f} | {first['state_bytes'] / n:.0f} | {first['json_bytes'] / n:.0f} "
            f"| {noop['seconds']:.1f} | {noop['rss']:.0f} | {fmt_counts(r.first_requests)} "
            f"| {fmt_counts(r.noop_requests)} |"
        )
    print()
    print(
        "| objects | checkpoints alone, every 100: whole JSON rewrite (before) s | bytes per object "
        "| peak RSS MiB | SQLite state (now) s | bytes per object | peak RSS MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c in costs:
        n, state, old = c["objects"], c["state"], c["rewrite"]
        before = (
            f"{old['seconds']:.2f} | {old['bytes'] / n:.0f} | {old['rss']:.0f}"
            if old
            else "not run (--old-max) | | "
        )
        print(
            f"| {n} | {before} | {state['seconds']:.2f} | {state['bytes'] / n:.0f} "
            f"| {state['rss']:.0f} |"
        )
    print()
    resumed = kill["resumed"]
    print(
        f"kill-and-resume at {rows[-1].objects}: killed (exit {kill['exit']}) at GET "
        f"{rows[-1].objects // 2}, the state held {kill['recorded']} images; the resumed sync "
        f"fetched {kill['gets']} objects in {resumed['seconds']:.1f}s (peak RSS "
        f"{resumed['rss']:.0f} MiB); {kill['files']} files "
        f"{'identical' if kill['same_files'] else 'DIFFERENT'} to the clean sync's, "
        f"sync_manifest.json {'byte-identical' if kill['same_manifest'] else 'DIFFERENT'}"
    )
    print()


def _scale_verdict(rows: list[ScaleRow], kill: dict[str, Any]) -> bool:
    """Print the checks (a failure is a bug) and the targets (reported); True when all checks pass."""
    checks: dict[str, bool] = {}
    for r in rows:
        n, first, noop = r.objects, r.first["result"], r.noop["result"]
        checks[f"{n}: first sync stored all {n} images"] = first["stored"] == first["images"] == n
        checks[f"{n}: no-op resync lists only, downloads nothing, same digest"] = (
            set(r.noop_requests) == {"LIST"}
            and (noop["unchanged"], noop["downloaded"]) == (n, 0)
            and noop["digest"] == first["digest"]
        )
    big = rows[-1].objects
    checks[f"kill-and-resume at {big}: killed by SIGKILL"] = kill["exit"] == -signal.SIGKILL
    checks[f"kill-and-resume at {big}: resumed fetched only what the state did not record"] = (
        kill["gets"] == big - kill["recorded"] and kill["resumed"]["result"]["images"] == big
    )
    checks[f"kill-and-resume at {big}: files and manifest byte-identical to a clean sync"] = (
        kill["same_files"] and kill["same_manifest"] and kill["files"] == big
    )
    for name, ok in checks.items():
        print(f"{'ok' if ok else 'FAILED'}: {name}")
    small, large = rows[0], rows[-1]
    per_object = (large.first["seconds"] / large.objects) / (small.first["seconds"] / small.objects)
    cpu = (large.first["cpu"] / large.objects) / (small.first["cpu"] / small.objects)
    rss = large.first["rss"] / small.first["rss"]
    noop_s = large.noop["seconds"]
    for name, ok, detail in (
        ("time per object flat within 20 %", per_object <= 1 + SCALE_FLAT, f"{per_object:.2f}x"),
        ("sync CPU per object flat within 20 %", cpu <= 1 + SCALE_FLAT, f"{cpu:.2f}x"),
        ("peak RSS flat within 20 %", rss <= 1 + SCALE_FLAT, f"{rss:.2f}x"),
        (f"no-op resync of {large.objects} under {SCALE_NOOP_S:g} s", noop_s < SCALE_NOOP_S,
         f"{noop_s:.1f} s"),
    ):  # fmt: skip
        print(
            f"target {name} ({small.objects} -> {large.objects}): "
            f"{'met' if ok else 'MISSED'} ({detail})"
        )
    return all(checks.values())


def scale(args: argparse.Namespace) -> int:
    """The --scale case: see the module docstring."""
    from leukemia.dev.embedded import aws_connection_json

    sizes = sorted(int(x) for x in args.scale.split(","))
    servers = start_servers("process", args.delay_ms / 1000, args.keep_alive, scale=True)
    assert servers.ask is not None
    workdir = Path(tempfile.mkdtemp(prefix="bench-s3-scale-"))
    try:
        os.environ["AIRFLOW_CONN_BENCH_S3"] = aws_connection_json(servers.url)
        bases, started = jpeg_bases(args.scale_size_kb), time.perf_counter()
        stored = sum(servers.ask(("fill", f"bench-scale-{n}", bases, n)) for n in sizes)
        moto_page, index_page = servers.ask(("listing-cost", f"bench-scale-{sizes[-1]}"))
        print(
            f"filled {sum(sizes)} objects of {stored / sum(sizes) / 1024:.1f} KB on average in "
            f"{time.perf_counter() - started:.1f}s, straight into moto's backend; "
            f"{args.delay_ms:g} ms delay per request, {args.workers} workers. One 1,000-key page "
            f"of {sizes[-1]} objects: moto's own listing {moto_page:.2f}s, the bench server's "
            f"sorted index {1000 * index_page:.1f} ms",
            flush=True,
        )
        rows = [_measure_size(servers, workdir, n, args.workers) for n in sizes]
        for n in sizes[:-1]:
            shutil.rmtree(workdir / f"sync-{n}")
        kill = _kill_and_resume(servers, workdir, sizes[-1], args.workers)
        costs = _checkpoint_costs(workdir, sizes, args.old_max)
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    _print_scale(rows, costs, kill)
    ok = _scale_verdict(rows, kill)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{machine()}; Python {platform.python_version()}; load average {load} (1/5/15 min)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
