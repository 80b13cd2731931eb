"""Command-line interface: thin callers of the library functions (see `python -m leukemia -h`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from leukemia.config import StorageConfig, env

if TYPE_CHECKING:
    from leukemia.predict import Prediction

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Register a sub-command handler under its function name (underscores become dashes)."""
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


@command
def cmd_synthetic(args: argparse.Namespace) -> int:
    from leukemia.dev.synthetic import generate

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
    from leukemia.dev.embedded import serve

    serve(args.host, args.port, args.delay_ms / 1000)
    return 0


@command
def cmd_demo(args: argparse.Namespace) -> int:
    from leukemia.dev.demo import run_demo

    conf = json.loads(args.conf) if args.conf else {}
    if args.weights:
        conf["weights"] = args.weights
    summary = run_demo(args.data, args.workdir, args.per_class, args.size, conf, args.verbose)
    return 0 if summary else 1


@command
def cmd_predict(args: argparse.Namespace) -> int:
    """Score images with the champion (or --model): exit 0 all scored, 1 some skipped, 2 no model."""
    import contextlib

    if not args.verbose:  # keep stderr to our own lines: skipped inputs, the summary, or the error
        for name in ("leukemia", "mlflow", "alembic", "botocore", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    results = sys.stdout
    # stdout carries the results only: whatever the libraries print (Airflow's hook logs) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        return _predict(args, results)


@command
def cmd_champion(args: argparse.Namespace) -> int:
    """`champion history`: every move of @champion; `champion rollback`: move it back.

    Rollback exit status: 0 moved and the scoring DAG notified, 1 moved but Airflow not notified
    (the line says what to do), 2 refused (nothing moved).
    """
    from leukemia import registry
    from leukemia.config import tracking_uri

    registry.check_tracking_server(tracking_uri())  # one line, before MLflow makes an empty store
    if args.champion_command == "history":
        moves = registry.history()
        for move in moves:
            print(move.describe())
        current = registry.current_champion()
        now = f"v{current.version}" if current is not None else "none"
        if not moves:
            print(f"no recorded moves of @champion of {registry.model_name()}")
        elif current is None or moves[-1].to_version != str(current.version):
            print(f"warning: @champion is {now} now, not v{moves[-1].to_version} as last recorded")
        print(f"@champion now: {now}")
        return 0
    return _rollback(args)


def _rollback(args: argparse.Namespace) -> int:
    import getpass
    import socket

    from leukemia import airflow_api, promotion

    by = args.by or getpass.getuser()
    move = promotion.rollback(args.to, args.reason, by, f"command line on {socket.gethostname()}")
    print(
        f"@champion moved: v{move['from_version'] or '–'} → v{move['to_version']} ({args.reason})"
    )
    try:
        event = airflow_api.emit_champion_event(move)
    except airflow_api.NotNotified as exc:
        print(f"warning: {exc}", file=sys.stderr)
        return 1
    print(f"Airflow notified: asset event {event.get('id', '?')} on leukemia_champion")
    return 0


def _predict(args: argparse.Namespace, results: TextIO) -> int:
    from dataclasses import replace

    from leukemia import predict, registry

    ref = registry.resolve_model(args.model)  # fails fast, before TensorFlow is imported
    if not ref.version:
        print(
            f"warning: {ref.uri} is not a registered version of {registry.model_name()}: its file "
            "is unverified (no recorded sha256, no gate); use it for ad-hoc checks only",
            file=sys.stderr,
        )
    sources, skipped = predict.collect_inputs(args.inputs, args.conn_id)
    loaded = predict.load_model(ref)
    explainer = None
    if args.explain:
        from leukemia.gradcam import Explainer

        explainer = Explainer(loaded.model, args.explain)
    writer = _PredictionWriter(results, args.format, max((len(s.name) for s in sources), default=5))
    scored = referred = 0
    for batch in predict.iter_batches(loaded, sources, args.batch_size):
        items = batch.predictions
        if explainer is not None:
            paths = explainer.add(batch.pixels, [p.image for p in items])
            items = [replace(p, overlay=str(o)) for p, o in zip(items, paths, strict=True)]
        for item in items:
            writer.row(item)
        scored += len(items)
        referred += sum(p.refer for p in items)
        skipped.extend(batch.skipped)
        results.flush()
    writer.close()
    for item in skipped:
        print(f"skipped {item.image}: {item.reason}", file=sys.stderr)
    sheet = explainer.finish() if explainer is not None else None
    note = f"; Grad-CAM overlays and {sheet.name} in {args.explain}" if sheet else ""
    print(
        f"scored {scored} images with {ref.describe()}, skipped {len(skipped)}, referred "
        f"{referred}{note}",
        file=sys.stderr,
    )
    return 1 if skipped else 0


class _PredictionWriter:
    """Streams predictions to stdout as an aligned table, a JSON list or CSV.

    The table ends with the prediction set and the referral (`no`, or `yes: <reason>`): the
    reason is free text, so it comes last."""

    def __init__(self, out: TextIO, fmt: str, name_width: int) -> None:
        import csv

        from leukemia.config import CLASSES
        from leukemia.predict import Prediction

        self.out, self.fmt, self.n = out, fmt, 0
        if fmt == "csv":
            columns = list(Prediction("", CLASSES[0], (1.0, 0.0, 0.0, 0.0), "").as_row())
            self.csv = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
            self.csv.writeheader()
        elif fmt == "table":
            widths = [max(name_width, 5), 6, *(max(len(c), 6) for c in CLASSES), 9, 7]
            self.widths = [*widths, len("|".join(CLASSES)), 5]
            header = ["image", "class", *CLASSES, "call", "model", "set", "refer"]
            print(self._line(header), file=out)

    def _line(self, cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, self.widths, strict=True)).rstrip()

    def row(self, item: Prediction) -> None:
        if self.fmt == "csv":
            self.csv.writerow(item.as_row())
        elif self.fmt == "json":
            print(
                ("[\n  " if self.n == 0 else ",\n  ") + json.dumps(item.as_dict()),
                end="",
                file=self.out,
            )
        else:
            cells = [
                item.image,
                item.label,
                *(f"{p:.4f}" for p in item.probabilities),
                item.call,
                item.model_version,
                item.set_label,
                f"yes: {item.refer_reason}" if item.refer else "no",
            ]
            print(self._line(cells), file=self.out)
        self.n += 1

    def close(self) -> None:
        if self.fmt == "json":
            print("\n]" if self.n else "[]", file=self.out)


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
    p.add_argument(
        "--size",
        type=int,
        help="image and model input size (default: 224; 64 when the VGG16 weights are none)",
    )
    p.add_argument("--weights", help="VGG16 weights: imagenet (default), a .h5 path, or none")
    p.add_argument("--conf", help='extra DAG run conf as JSON, e.g. {"epochs": 10}')

    _add_predict(sub)
    _add_champion(sub)
    return parser


def _add_predict(sub: Any) -> None:
    """The `predict` sub-command and its options."""
    p = sub.add_parser(
        "predict",
        help="classify images (files, folders, s3:// URIs) with the champion model",
        description="Score images with a registered model. Exit status: 0 all scored, 1 some input "
        "skipped (reasons on stderr), 2 no usable model (one line on stderr).",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH_OR_S3_URI",
        help="image files, folders, s3://bucket/prefix",
    )
    p.add_argument(
        "--model", help="MLflow model URI (default: models:/$LEUKEMIA_MODEL_NAME@champion)"
    )
    p.add_argument(
        "--format", choices=["table", "json", "csv"], default="table", help="stdout format"
    )
    p.add_argument(
        "--explain",
        type=Path,
        metavar="OUT_DIR",
        help="write Grad-CAM overlays and a contact sheet",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="images scored at once (bounds memory)"
    )
    p.add_argument(
        "--conn-id", default=env("LEUKEMIA_AWS_CONN_ID"), help="Airflow connection for s3:// inputs"
    )


def _add_champion(sub: Any) -> None:
    """The `champion history|rollback` sub-commands and their options."""
    p = sub.add_parser(
        "champion",
        help="the history of @champion, and rolling it back",
        description="history: every move of @champion (when, from which version to which, why, "
        "by whom). rollback: move @champion back to a version whose model file verifies, record "
        "the move, and notify Airflow so the scoring DAG re-scores (exit 0 notified, 1 moved but "
        "not notified, 2 refused).",
    )
    champion = p.add_subparsers(dest="champion_command", required=True)
    champion.add_parser("history", help="every recorded move of @champion, oldest first")
    r = champion.add_parser("rollback", help="move @champion back to an earlier version")
    r.add_argument("--to", required=True, metavar="VERSION", help="the registered version number")
    r.add_argument("--reason", default="no reason given", help="why: recorded with the move")
    r.add_argument("--by", help="who (default: your login name)")


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
