"""Shared pieces of the benchmarks: where the real data and weights are, machine facts, tables."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "leukemia-dev"
WEIGHTS = ROOT.parent / "shared" / "weights" / "vgg16_hed_notop.weights.h5"
OUT = ROOT / "bench" / "out"
VGG16_GFLOP_224 = 30.7  # multiply-adds × 2 of the conv base per 224×224 image


def machine() -> str:
    """One line: date, CPU model, cores."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"{stamp}; {model}; {os.cpu_count()} CPU cores"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of dict rows (floats to 3 significant decimals)."""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def require(path: Path, what: str) -> Path:
    """Exit with a clear message when the real data or weights are not there."""
    if not path.exists():
        raise SystemExit(f"{what} not found at {path}: this benchmark needs ../shared (see README)")
    return path


def matmul_gflops(
    dtype: str = "float32", n: int = 2048, repeats: int = 10, trials: int = 5
) -> float:
    """Measured TensorFlow matmul throughput on this machine (GFLOP/s): the best of `trials` timings
    of `repeats` n×n products, so that one slow moment does not lower the "peak"."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype="float32")
    a = tf.cast(a, dtype)
    b = tf.identity(a)
    tf.linalg.matmul(a, b).numpy()  # warm-up
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            c = tf.linalg.matmul(a, b)
        c.numpy()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def real_data_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser for a benchmark on the real images: --data and --weights, ../shared defaults."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA, help="folder of class subfolders")
    parser.add_argument(
        "--weights",
        default=str(WEIGHTS),
        help="VGG16 no-top weights: a file (default: ../shared's offline file), imagenet, or none",
    )
    return parser


def parse_real_data_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the arguments, quieten library logs, and exit clearly without the data or weights."""
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from leukemia.weights import WeightsUnavailable, resolve_weights

    require(args.data, "leukemia-dev images")
    try:
        args.weights = resolve_weights(args.weights)
    except WeightsUnavailable as exc:
        raise SystemExit(
            f"{exc} (this benchmark defaults to ../shared's file: see README)"
        ) from None
    return args


def logistic(x_train: Any, y_train: Any) -> Any:
    """The baseline classifier of the quality benchmarks: a standardised logistic regression (C 0.5),
    fitted on frozen pooled features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5)).fit(
        x_train, y_train
    )
