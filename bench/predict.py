"""Prediction on CPU through `leukemia.predict`: batch throughput, warm single-image latency, and peak
memory against the number of images scored.

A model is trained the pipeline's way on a few synthetic smears (VGG16 with weights "none": the
speed of a forward pass does not depend on the weight values; head 1 epoch), registered in a
temporary SQLite MLflow and made champion, then:

- throughput: `iter_batches` over a folder of 224-px JPEGs, batch 32, after one warm-up batch
  (reading and decoding included, as in production);
- latency: one image per call, warm, median and 90th percentile of `--calls` calls;
- memory: `python -m leukemia predict FOLDER --format csv > /dev/null` in a fresh process per N,
  peak RSS from the child's VmHWM and from psutil sampling every 50 ms. The folder holds N symlinks to
  a few JPEGs. One run at the full size (N = the throughput images) gives the absolute peak; the
  memory-vs-N runs use `--mem-size` px (default 32, VGG16's smallest input) so that 10,000 images
  take minutes on 2 shared cores, not an hour; the streaming loop is the same at any size.

    python bench/predict.py                      # 224 px timing, memory for N = 1,000 and 10,000
    python bench/predict.py --counts 200 2000    # quicker
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, table  # noqa: E402

MODEL_NAME = "leukemia-classifier"


def register(work: Path, size: int, name: str, alias: str | None) -> str:
    """Train a head for 1 epoch on 4 synthetic smears per class; register; return the version URI."""
    import mlflow

    from leukemia.dev.synthetic import generate
    from leukemia.model import ModelConfig
    from leukemia.runs import train_folder
    from leukemia.tracking import log_full_model
    from leukemia.training import TrainConfig

    images = work / f"train-{size}"
    generate(images, n_per_class=4, size=size, seed=7)
    cfg = TrainConfig(epochs=1, batch_size=8, model=ModelConfig(input_size=size, weights="none"))
    done = train_folder(images, cfg, work / f"train-{size}-work", (0.34, 0.33, 0.33), "float32")
    model_uri = log_full_model(done["result"].run_id, images, done["split"].path)
    version = mlflow.register_model(model_uri, name).version
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return f"models:/{name}/{version}"


def symlink_folder(folder: Path, sources: list[Path], n: int) -> Path:
    """`n` image files (symlinks to `sources`, round robin) in a flat folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        os.symlink(src, folder / f"img-{i:06d}{src.suffix}")
    return folder


def timing(size: int, folder: Path, batch: int, calls: int) -> dict[str, Any]:
    """Load time, batch throughput and single-image latency through predict.py, in this process."""
    from leukemia import predict

    started = time.perf_counter()
    loaded = predict.load_model()  # the champion, resolved through the alias
    load_s = time.perf_counter() - started
    sources, _ = predict.collect_inputs([folder])
    for _ in predict.iter_batches(loaded, sources[:batch], batch):  # warm-up: traces the graph
        pass
    timed = sources[batch:]
    started = time.perf_counter()
    n = sum(len(b.predictions) for b in predict.iter_batches(loaded, timed, batch))
    throughput = n / (time.perf_counter() - started)
    for _ in predict.iter_batches(loaded, sources[:1], 1):  # warm the batch-of-one shape
        pass
    latencies = []
    for i in range(calls):
        started = time.perf_counter()
        for _ in predict.iter_batches(loaded, [sources[i % len(sources)]], 1):
            pass
        latencies.append(1000 * (time.perf_counter() - started))
    latencies.sort()
    return {
        "input px": size,
        "model load s": round(load_s, 2),
        f"throughput img/s (batch {batch}, {n} images)": round(throughput, 2),
        f"latency ms median ({calls} calls)": round(statistics.median(latencies), 1),
        "latency ms p90": round(latencies[int(0.9 * (len(latencies) - 1))], 1),
        "version": loaded.version,
    }


def _hwm_kib(pid: int) -> int:
    """VmHWM of a process: its peak resident set since exec, in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_run(folder: Path, n: int, uri: str, batch: int, env: dict[str, str]) -> dict[str, Any]:
    """Run the CLI on `folder` in a fresh process; its peak RSS by VmHWM and by psutil sampling.

    (The child's ru_maxrss from wait4 is no use here: Linux carries the forking parent's high-water
    mark across exec, and the parent holds a 224-px model.)
    """
    import psutil

    cmd = [
        sys.executable,
        "-m",
        "leukemia",
        "predict",
        str(folder),
        "--model",
        uri,
        "--format",
        "csv",
        "--batch-size",
        str(batch),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
    )
    peak = {"rss": 0, "hwm": 0}
    done = threading.Event()

    def sample() -> None:
        child = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak["rss"] = max(peak["rss"], child.memory_info().rss)
            except psutil.Error:
                return
            peak["hwm"] = max(peak["hwm"], _hwm_kib(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read() if proc.stderr else ""  # the child exits after closing stderr
    proc.wait()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    summary = [line for line in stderr.splitlines() if line.startswith("scored ")]
    if proc.returncode != 0 or not summary or not summary[-1].startswith(f"scored {n} images"):
        raise SystemExit(f"predict on {n} images failed ({proc.returncode}): {stderr[-2000:]}")
    return {
        "images (N)": n,
        "wall s (start, load, score)": round(seconds, 1),
        "peak RSS MB (VmHWM)": round(peak["hwm"] / 1024, 1),
        "peak RSS MB (sampled 50 ms)": round(peak["rss"] / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=int, default=224, help="input size for throughput and latency"
    )
    parser.add_argument(
        "--mem-size", type=int, default=32, help="input size for the memory-vs-N runs"
    )
    parser.add_argument(
        "--counts", type=int, nargs="+", default=[1000, 10000], help="N for the memory runs"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20, help="single-image calls for the latency")
    parser.add_argument("--timed-batches", type=int, default=3, help="batches timed for throughput")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tensorflow").setLevel(
        logging.ERROR
    )  # retracing notes from the training builds
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # MLflow's artifacts go to ./mlruns
        os.environ["LEUKEMIA_DATA_DIR"] = str(work / "data")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        os.environ["PYTHONPATH"] = str(ROOT / "include")
        from leukemia import tracking
        from leukemia.dev.synthetic import generate

        tracking.setup()
        print(
            f"# Prediction benchmark — {machine()}; load average {os.getloadavg()[0]:.1f} at start"
        )
        started = time.perf_counter()
        register(work, args.size, MODEL_NAME, alias="champion")
        mem_uri = register(work, args.mem_size, f"{MODEL_NAME}-{args.mem_size}px", alias=None)
        print(f"(models trained and registered in {time.perf_counter() - started:.0f}s)\n")

        pics = generate(work / "pics", n_per_class=2, size=args.size, seed=11)
        n_timed = args.batch * (args.timed_batches + 1)
        folder = symlink_folder(work / "timing", pics, n_timed)
        row = timing(args.size, folder, args.batch, args.calls)
        print(f"## Throughput and latency, {args.size} px, CPU, through predict.iter_batches\n")
        print(table([row]))

        champion = f"models:/{MODEL_NAME}@champion"
        rows = [
            {
                "input px": args.size,
                **memory_run(folder, n_timed, champion, args.batch, dict(os.environ)),
            }
        ]
        small = generate(work / f"pics-{args.mem_size}", n_per_class=2, size=args.mem_size, seed=11)
        for n in args.counts:
            folder = symlink_folder(work / f"mem-{n}", small, n)
            rows.append(
                {
                    "input px": args.mem_size,
                    **memory_run(folder, n, mem_uri, args.batch, dict(os.environ)),
                }
            )
        print(
            f"\n## Peak memory of `python -m leukemia predict FOLDER --format csv --batch-size {args.batch}` vs N\n"
        )
        print(table(rows))
        first, last = rows[1], rows[-1]
        if len(rows) > 2:
            growth = last["peak RSS MB (VmHWM)"] - first["peak RSS MB (VmHWM)"]
            print(
                f"\nAt {args.mem_size} px, peak RSS changes by {growth:+.1f} MB from N={first['images (N)']:,} to "
                f"N={last['images (N)']:,} ({last['images (N)'] / first['images (N)']:.0f}x the images)."
            )
        os.chdir(ROOT)


if __name__ == "__main__":
    main()
