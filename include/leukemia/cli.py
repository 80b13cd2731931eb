"""Command-line interface: thin callers of the library functions (see `python -m leukemia -h`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from leukemia.config import StorageConfig, env

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Register a sub-command handler under its function name (underscores become dashes)."""
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


@command
def cmd_synthetic(args: argparse.Namespace) -> int:
    from leukemia.synthetic import generate

    paths = generate(args.out, n_per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"Wrote {len(paths)} synthetic smears ({args.size}x{args.size}) under {args.out}")
    return 0


@command
def cmd_seed_bucket(args: argparse.Namespace) -> int:
    from leukemia.storage import upload_folder

    n = upload_folder(args.source, args.bucket, args.prefix, conn_id=args.conn_id)
    print(f"Uploaded {n} images from {args.source} to s3://{args.bucket}/{args.prefix}")
    return 0


@command
def cmd_sync(args: argparse.Namespace) -> int:
    from leukemia.storage import sync_images

    cfg = StorageConfig.from_env(
        bucket=args.bucket, prefix=args.prefix, conn_id=args.conn_id, local_dir=args.dest
    )
    result = sync_images(cfg)
    print(json.dumps(result.summary(), indent=1))
    return 1 if result.failed else 0


@command
def cmd_split(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from leukemia.dataset import make_split

    info = make_split(args.images, args.out, seed=args.seed)
    print(json.dumps(asdict(info), indent=1))
    return 0


@command
def cmd_s3_server(args: argparse.Namespace) -> int:
    from leukemia.embedded import serve

    serve(args.host, args.port, args.delay_ms / 1000)
    return 0


@command
def cmd_demo(args: argparse.Namespace) -> int:
    from leukemia.demo import run_demo

    conf = json.loads(args.conf) if args.conf else {}
    if args.weights:
        conf["weights"] = args.weights
    summary = run_demo(args.data, args.workdir, args.per_class, args.size, conf)
    return 0 if summary else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command and its documented options."""
    parser = argparse.ArgumentParser(prog="python -m leukemia", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", help="write seeded synthetic smears as <Class>/<name>.jpg")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("seed-bucket", help="upload a <Class>/<name> folder to s3://BUCKET/PREFIX")
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--bucket", default=env("LEUKEMIA_BUCKET"))
    p.add_argument("--prefix", default=env("LEUKEMIA_RAW_PREFIX"))
    p.add_argument("--conn-id", default=env("LEUKEMIA_AWS_CONN_ID"))

    p = sub.add_parser("sync", help="incremental sync of s3://BUCKET/PREFIX to a local folder")
    p.add_argument("--bucket")
    p.add_argument("--prefix")
    p.add_argument("--conn-id")
    p.add_argument("--dest", type=Path, help="default: $LEUKEMIA_DATA_DIR/images")

    p = sub.add_parser("split", help="manifest and stable train/val/test split of an image folder")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("s3-server", help="run the local S3 server (moto) in the foreground")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--delay-ms", type=float, default=0.0, help="added to every request")
    p = sub.add_parser("demo", help="run the whole training pipeline on the embedded stack")
    p.add_argument("--data", type=Path, help="a <Class>/<name> folder (default: synthetic smears)")
    p.add_argument("--workdir", type=Path, help="default: ./data/demo")
    p.add_argument("--per-class", type=int, default=30, help="synthetic images per class")
    p.add_argument("--size", type=int, default=224, help="image and model input size")
    p.add_argument("--weights", help="VGG16 weights: imagenet (default), a .h5 path, or none")
    p.add_argument("--conf", help='extra DAG run conf as JSON, e.g. {"epochs": 10}')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run one command, and turn expected errors into one clear line."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
