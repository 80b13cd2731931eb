"""Scaling out: the training DAG on 1 and on 2 Celery workers, each pinned to one core.

Each worker count gets a fresh production-shaped stack (`leukemia.dev.stack`: PostgreSQL, Redis,
moto, an MLflow server, Airflow on the CeleryExecutor) with worker i pinned to core i by `taskset`,
so that the machine's 2 cores stand for 2 hosts; the same images and the same run conf go to both.
Measured from the task instances that the REST API reports: extraction wall time (first start to
last end of the `extract_features` shards, mapped over `extract_shards`) and grid
wall time (the same over `train`), and per image: extraction seconds, image bytes, feature bytes,
MLflow artifact bytes. Target: 2 workers at least 1.8x one worker for extraction.

    python bench/scale.py                                   # 160 synthetic 224 px smears
    python bench/scale.py --real                            # real images, ../shared weights
    python bench/scale.py --per-class 80 --epochs 10 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, OUT, ROOT, WEIGHTS, machine, require, table  # noqa: E402

TARGET = 1.8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--real", action="store_true", help=f"the real images in {DATA}")
    parser.add_argument("--data", type=Path, help="another <Class>/<name> folder of images")
    parser.add_argument("--per-class", type=int, default=40, help="synthetic images per class")
    parser.add_argument("--size", type=int, default=224, help="synthetic image and input size")
    parser.add_argument("--weights", help="default: none (synthetic), ../shared weights (real)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--shards", type=int, default=2, help="the run's extract_shards")
    parser.add_argument("--keep", action="store_true", help="keep the stacks' folders")
    return parser.parse_args()


def bucket_bytes(stack: Any, bucket: str, prefix: str = "") -> int:
    """Total size of the objects under s3://bucket/prefix on the stack's S3 server."""
    client = stack.s3_client()
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


def measure(workers: int, source: Path, conf: dict[str, Any], keep: bool) -> dict:
    """One fresh stack with `workers` pinned workers, one DAG run; the figures of that run."""
    from leukemia.config import env
    from leukemia.dev.stack import ARTIFACT_BUCKET, StackError, open_session, summary_lines

    root = Path(tempfile.mkdtemp(prefix=f"leukemia-scale-{workers}w-"))
    with open_session(root, data=source, workers=workers, cpus=list(range(workers))) as session:
        stack = session.stack
        result = stack.run(conf, timeout_s=3600)
        print("\n".join(summary_lines(result)), flush=True)
        if result.state != "success":
            raise StackError(stack.diagnosis(result))
        extraction = result.of("extract_features")
        features = bucket_bytes(stack, stack.bucket, "work/features/")  # the feature shards
        figures = {
            "workers": workers,
            "images": session.images,
            "extraction tasks": len(extraction),
            "extraction s": result.span_s("extract_features"),
            "extraction task-s per image": sum(t.seconds or 0 for t in extraction) / session.images,
            "train tasks": len(result.of("train")),
            "grid s": result.span_s("train"),
            "train task-s mean": sum(t.seconds or 0 for t in result.of("train"))
            / max(1, len(result.of("train"))),
            "run s": result.wall_s,
            "hosts of train": ",".join(sorted(result.hosts("train"))),
            "image bytes per image": bucket_bytes(stack, stack.bucket, env("LEUKEMIA_RAW_PREFIX"))
            / session.images,
            "feature bytes per image": features / session.images,
            "artifact bytes per run": bucket_bytes(stack, ARTIFACT_BUCKET),
            "load average after": round(os.getloadavg()[0], 1),  # other jobs skew every ratio
        }
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return figures


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT / "include"))
    from leukemia.dev.synthetic import generate

    if args.real or args.data:
        source = require(args.data or DATA, "the real images")
        weights = args.weights or str(require(WEIGHTS, "the offline VGG16 weights"))
        size = 224
    else:
        source = Path(tempfile.mkdtemp(prefix="leukemia-scale-source-"))
        generate(source, n_per_class=args.per_class, size=args.size, seed=11)
        weights, size = args.weights or "none", args.size
    conf = {
        "optimizers": ["adam", "rmsprop"],
        "batch_sizes": [16, 32],
        "variants": ["seed"],
        "epochs": args.epochs,
        "input_size": size,
        "weights": weights,
        "precision": "float32",
        "extract_shards": args.shards,
    }
    load_before = os.getloadavg()
    print(f"{machine()}; load average {load_before[0]:.1f}", flush=True)
    try:
        rows = [measure(n, source, conf, args.keep) for n in args.workers]
    finally:
        if not (args.real or args.data or args.keep):
            shutil.rmtree(source, ignore_errors=True)  # the synthetic smears made above
    load_after = os.getloadavg()

    print(f"\n## Scale-out (bench/scale.py), {machine()}")
    print(
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"no shared disk; conf {json.dumps(conf)}\n"
    )
    columns = [
        "workers",
        "images",
        "extraction tasks",
        "extraction s",
        "train tasks",
        "grid s",
        "run s",
        "hosts of train",
        "load average after",
    ]
    print(table(rows, columns))
    per_image = ["workers", "extraction task-s per image", "image bytes per image"]
    per_image += ["feature bytes per image", "artifact bytes per run", "train task-s mean"]
    print()
    print(table(rows, per_image))
    one = next((r for r in rows if r["workers"] == 1), None)
    for row in rows:
        if one is None or row is one:
            continue
        for what in ("extraction s", "grid s", "run s"):
            if one[what] and row[what]:
                print(f"{what}: {row['workers']} workers {one[what] / row[what]:.2f}x one worker")
        verdict = "met" if one["extraction s"] / row["extraction s"] >= TARGET else "not met"
        print(f"extraction target ({TARGET}x): {verdict}")
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = OUT / f"scale-{stamp}.json"
    out.write_text(json.dumps({"machine": machine(), "conf": conf, "rows": rows}, indent=1))
    print(f"\nfigures: {out}")


if __name__ == "__main__":
    main()
