"""Artifact bytes per DAG run: what the training runs store in MLflow, before and after issue 13.

Before, every configuration's run logged the full Keras model (the frozen VGG16 trunk, 58 MB, plus
its head), a prediction grid and a copy of the split. After, a configuration's run logs its head
(`head/head.keras`), figures and metrics; the full model, grid and split are logged only for the run
that is registered (`tracking.log_full_model`, called by promotion).

Everything below is measured on the files MLflow wrote: the DAG's default grid (3 optimizers × 3
batch sizes × 2 variants = 18 configurations) is trained with `runs.train_run` on real images;
for one run of each variant the full model is assembled and logged as promotion does. "Before" per
configuration is then that run's files minus its head plus the full model, grid and split that the
old `log_outcome` logged for every configuration (the same files, measured here).

    python bench/artifacts.py --images 240
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, parse_real_data_args, real_data_parser, table  # noqa: E402

MB = 1e6


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def sample_folder(data: Path, out: Path, n: int) -> Path:
    """About `n` images of `data`, the same share of each class, as symlinks in `<Class>/` folders."""
    from leukemia.images import iter_image_files

    files = list(iter_image_files(data))
    share = n / len(files)
    for label in sorted({label for label, _ in files}):
        mine = sorted(p for c, p in files if c == label)
        step = max(1, round(1 / share))
        for path in mine[::step]:
            (out / label).mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), out / label / path.name)
    return out


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--images", type=int, default=240, help="real images in the sample")
    parser.add_argument("--epochs", type=int, default=30, help="the DAG's default")
    args = parse_real_data_args(parser)
    work = OUT / "artifacts"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["LEUKEMIA_DATA_DIR"] = str(work / "data")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"

    import mlflow

    from leukemia.config import OPTIMIZERS, RUN_DEFAULTS, VARIANTS
    from leukemia.dataset import make_split, read_split
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig
    from leukemia.runs import train_run
    from leukemia.tracking import HEAD_ARTIFACT, log_full_model
    from leukemia.training import TrainConfig, grid

    images = sample_folder(args.data, work / "images", args.images)
    info = make_split(images, work / "splits")
    rows = read_split(info.path)
    model = ModelConfig(input_size=224, weights=str(args.weights))
    ex = extract_features(
        [images / r["path"] for r in rows], [r["sha256"] for r in rows], model, work / "features"
    )
    base = TrainConfig(epochs=args.epochs, model=model)
    configs = grid(list(OPTIMIZERS), list(RUN_DEFAULTS.batch_sizes), list(VARIANTS), base)
    print(
        f"{machine()}\n{len(rows)} images, {len(configs)} configurations, 224 px, {ex.precision}\n"
    )

    runs = []
    for i, cfg in enumerate(configs):
        tags = {"airflow_run_id": "bench", "airflow_map_index": str(i)}
        result = train_run(cfg, info.path, images, ex.cache_dir, tags)
        folder = local(mlflow.get_run(result.run_id).info.artifact_uri)
        runs.append((cfg, result.run_id, folder, folder_bytes(folder)))

    measured = {}
    for variant in VARIANTS:
        cfg, run_id, folder, after = next(r for r in runs if r[0].model.variant == variant)
        head = (folder / HEAD_ARTIFACT).stat().st_size
        model_uri = log_full_model(run_id, images, info.path)
        full = folder_bytes(
            local(mlflow.get_logged_model(model_uri.split("/")[-1]).artifact_location)
        )
        extras = folder_bytes(folder) - after  # the prediction grid and the split copy
        measured[variant] = {"head": head, "full": full, "extras": extras}

    per_config = []
    for variant in VARIANTS:
        sizes = [r[3] for r in runs if r[0].model.variant == variant]
        m = measured[variant]
        after = sum(sizes) / len(sizes)
        before = after - m["head"] + m["full"] + m["extras"]
        per_config.append(
            {
                "variant": variant,
                "configs": len(sizes),
                "head MB": m["head"] / MB,
                "full model MB": m["full"] / MB,
                "before: MB per config": before / MB,
                "after: MB per config": after / MB,
            }
        )
    print(table(per_config))
    total_after = sum(r[3] for r in runs)
    total_before = sum(
        r[3]
        - measured[r[0].model.variant]["head"]
        + measured[r[0].model.variant]["full"]
        + measured[r[0].model.variant]["extras"]
        for r in runs
    )
    registered = max(m["full"] + m["extras"] for m in measured.values())
    print(
        f"\nper DAG run of {len(runs)} configurations: before {total_before / MB:.1f} MB, "
        f"after {total_after / MB:.1f} MB besides the registered model "
        f"(+ {registered / MB:.1f} MB for it: full model, grid, split)"
    )
    print(
        f"target ≤ 100 MB besides the registered model: {'met' if total_after <= 100 * MB else 'missed'}"
    )


if __name__ == "__main__":
    main()
