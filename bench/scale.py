"""Scaling out: the training DAG on 1 and on 2 Celery workers, each pinned to one core.

Each worker count gets a fresh production-shaped stack (`leukemia.dev.stack`: PostgreSQL, Redis,
moto, an MLflow server, Airflow on the CeleryExecutor) with worker i pinned to core i by `taskset`,
so that the machine's 2 cores stand for 2 hosts; the same images and the same run conf go to both.
Measured from the task instances that the REST API reports: extraction wall time (first start to
last end of the `extract_features` shards, mapped over `extract_shards`) and grid
wall time (the same over `train`), and per image: extraction seconds, image bytes, feature bytes,
MLflow artifact bytes. Target: 2 workers at least 1.8x one worker for extraction.

`--grid small` (the default here) is 2 optimizers x 2 batch sizes x the default heads, 5 epochs;
`--grid default` is the training DAG's own grid. Both keep the other defaults (halving on among
them) unless `--conf` says otherwise. `--halving`: at each
worker count, the full grid (`halving` off) and then a second run in the same stack with halving on
(its features come from the first run's cache in the work store, so it differs from the first only
in the grid). A halving grid's wall time spans all its rounds.

    python bench/scale.py                                   # 160 synthetic 224 px smears
    python bench/scale.py --real                            # real images, ../shared weights
    python bench/scale.py --per-class 80 --epochs 10 --workers 1 2
    python bench/scale.py --data DIR --grid default --halving --workers 2 --conf '{"audit_images": 0}'
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
GRID_TASKS = ("train", "train_round2", "train_round3")  # the rounds of a halving grid


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
    parser.add_argument("--epochs", type=int, default=5, help="with --grid small")
    parser.add_argument("--grid", choices=["small", "default"], default="small")
    parser.add_argument("--halving", action="store_true", help="also run the grid with halving")
    parser.add_argument("--conf", type=json.loads, default={}, help="more of the run's conf (JSON)")
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


def run_figures(result: Any, session: Any, halving: bool, artifacts_before: int) -> dict:
    """The figures of one finished DAG run on the session's stack (`artifacts_before`: the
    artifact bucket's bytes before the run)."""
    from leukemia.config import env
    from leukemia.dev.stack import ARTIFACT_BUCKET

    stack, images = session.stack, session.images
    extraction = result.of("extract_features")
    trains = [t for t in result.of(*GRID_TASKS) if t.state != "skipped"]  # empty rounds skip
    raw_bytes = bucket_bytes(stack, stack.bucket, env("LEUKEMIA_RAW_PREFIX"))
    return {
        "workers": len(stack.workers),
        "halving": halving,
        "images": images,
        "extraction tasks": len(extraction),
        "extraction s": result.span_s("extract_features"),
        "extraction task-s per image": sum(t.seconds or 0 for t in extraction) / images,
        "train tasks": len(trains),
        "grid s": result.span_s(*GRID_TASKS),
        "train task-s mean": sum(t.seconds or 0 for t in trains) / max(1, len(trains)),
        "run s": result.wall_s,
        "hosts of train": ",".join(sorted(result.hosts(*GRID_TASKS))),
        "image bytes per image": raw_bytes / images,
        "feature bytes per image": bucket_bytes(stack, stack.bucket, "work/features/") / images,
        "artifact bytes per run": bucket_bytes(stack, ARTIFACT_BUCKET) - artifacts_before,
        "load average after": round(os.getloadavg()[0], 1),  # other jobs skew every ratio
    }


def measure(workers: int, source: Path, confs: list[dict[str, Any]], keep: bool) -> list[dict]:
    """One fresh stack with `workers` pinned workers, one DAG run per conf; each run's figures."""
    from leukemia.config import RUN_DEFAULTS
    from leukemia.dev.stack import ARTIFACT_BUCKET, StackError, open_session, summary_lines

    root = Path(tempfile.mkdtemp(prefix=f"leukemia-scale-{workers}w-"))
    rows = []
    with open_session(root, data=source, workers=workers, cpus=list(range(workers))) as session:
        stack = session.stack
        for conf in confs:
            artifacts_before = bucket_bytes(stack, ARTIFACT_BUCKET)  # the runs before this one
            result = stack.run(conf, timeout_s=3600)
            print("\n".join(summary_lines(result)), flush=True)
            if result.state != "success":
                raise StackError(stack.diagnosis(result))
            halving = conf.get("halving", RUN_DEFAULTS.halving)
            rows.append(run_figures(result, session, halving, artifacts_before))
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def print_ratios(rows: list[dict]) -> None:
    """More workers against one, each grid against itself; halving against the full grid."""
    for row in rows:
        one = next((r for r in rows if r["workers"] == 1 and r["halving"] == row["halving"]), None)
        grid = "halving grid" if row["halving"] else "full grid"
        if one is not None and row is not one:
            for what in ("grid s", "run s") + (() if row["halving"] else ("extraction s",)):
                if one[what] and row[what]:
                    ratio = one[what] / row[what]
                    print(f"{what} ({grid}): {row['workers']} workers {ratio:.2f}x one worker")
            if not row["halving"]:
                met = one["extraction s"] / row["extraction s"] >= TARGET
                print(f"extraction target ({TARGET}x): {'met' if met else 'not met'}")
        full = next((r for r in rows if r["workers"] == row["workers"] and not r["halving"]), None)
        if row["halving"] and full and full["grid s"] and row["grid s"]:
            ratio = row["grid s"] / full["grid s"]
            on = f"{row['workers']} worker" + ("s" if row["workers"] > 1 else "")
            print(f"grid s on {on}: halving {ratio:.2f}x the full grid")


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
    conf: dict[str, Any] = {"input_size": size, "weights": weights, "extract_shards": args.shards}
    if args.grid == "small":
        conf |= {"optimizers": ["adam", "rmsprop"], "batch_sizes": [16, 32], "variants": ["seed"]}
        conf |= {"epochs": args.epochs, "precision": "float32"}
    conf |= args.conf
    confs = [conf]
    if args.halving:  # the second run trains again on the same images: force_retrain
        confs = [{**conf, "halving": False}, {**conf, "halving": True, "force_retrain": True}]
    load_before = os.getloadavg()
    print(f"{machine()}; load average {load_before[0]:.1f}", flush=True)
    try:
        rows = [row for n in args.workers for row in measure(n, source, confs, args.keep)]
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
        "halving",
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
    per_image = ["workers", "halving", "extraction task-s per image", "image bytes per image"]
    per_image += ["feature bytes per image", "artifact bytes per run", "train task-s mean"]
    print()
    print(table(rows, per_image))
    print_ratios(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = OUT / f"scale-{stamp}.json"
    out.write_text(json.dumps({"machine": machine(), "conf": conf, "rows": rows}, indent=1))
    print(f"\nfigures: {out}")


if __name__ == "__main__":
    main()
