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
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing as mp
import os
import platform
import shutil
import struct
import sys
import tempfile
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


def _keep_alive() -> None:
    """Let moto's werkzeug handler keep connections open (HTTP/1.1), as S3 does; it speaks HTTP/1.0,
    which costs every request a new TCP connection and a new server thread."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    MotoRequestHandler.protocol_version = "HTTP/1.1"


def _serve(conn: Any, delay_s: float, keep_alive: bool) -> None:
    """Child process: one server without delay (for the upload) and one with it, same backend."""
    logging.disable(logging.INFO)
    from leukemia.dev.embedded import S3Server

    if keep_alive:
        _keep_alive()
    upload, timed = S3Server().start(), S3Server(delay_s=delay_s).start()
    conn.send((upload.endpoint_url, timed.endpoint_url))
    while True:
        command = conn.recv()
        if command == "counts":
            conn.send(dict(timed.requests.counts))
        elif command == "reset":
            timed.requests.reset()
            conn.send(None)
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


def start_servers(mode: str, delay_s: float, keep_alive: bool) -> Servers:
    """moto's S3 server twice on loopback; both share moto's in-memory backend."""
    if mode == "thread":
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
    proc = ctx.Process(target=_serve, args=(child, delay_s, keep_alive), daemon=True)
    proc.start()
    upload_url, url = parent.recv()

    def ask(command: str) -> Any:
        parent.send(command)
        return parent.recv()

    def stop() -> None:
        ask("stop")
        proc.join(timeout=10)

    return Servers(upload_url, url, lambda: ask("counts"), lambda: ask("reset"), stop)


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
    args = parser.parse_args(argv)
    quiet_logs()

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


if __name__ == "__main__":
    sys.exit(main())
