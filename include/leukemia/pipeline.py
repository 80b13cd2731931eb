"""The training pipeline's steps as plain functions: each takes plain values and returns a small dict.

The Airflow DAG (`dags/leukemia_training.py`) calls one of these per task, so everything here runs
and is tested without Airflow; XCom carries only what these return (paths, ids, URIs, metrics).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from leukemia.config import RUN_DEFAULTS, StorageConfig, data_dir

log = logging.getLogger(__name__)


def sync(
    bucket: str | None = None,
    prefix: str | None = None,
    conn_id: str | None = None,
    max_failed_fraction: float = 0.0,
) -> dict[str, Any]:
    """Sync new and changed images from S3 into the data folder.

    Fails when more than `max_failed_fraction` of the listed objects failed to download (bad
    images are skipped, not failed), so that nothing is trained on a partial image set.
    """
    from leukemia.storage import sync_images

    cfg = StorageConfig.from_env(
        bucket=bucket or None, prefix=prefix or None, conn_id=conn_id or None
    )
    result = sync_images(cfg)
    result.require_complete(max_failed_fraction)
    if result.images == 0:
        raise ValueError(
            f"no usable images under s3://{cfg.bucket}/{cfg.prefix}: expected "
            f"{cfg.prefix}<Benign|Early|Pre|Pro>/<name>.jpg (see {result.report_path})"
        )
    return {**result.summary(), "images_dir": str(cfg.local_dir)}


def split(images_dir: str, seed: int = 0) -> dict[str, Any]:
    """Manifest and stable split of the synced images."""
    from leukemia.dataset import make_split

    info = make_split(images_dir, data_dir() / "splits", seed=seed)
    out = asdict(info)
    out["images_dir"] = images_dir
    out["conflicts"] = len(info.conflicts)
    return out


def needs_training(digest: str, force: bool = False, model_name: str | None = None) -> bool:
    """False when the champion was trained on exactly this image set (and no retrain is forced)."""
    from leukemia import registry, tracking

    tracking.setup()
    model_name = registry.model_name(model_name)
    trained_on = registry.champion_digest(model_name)
    if force:
        log.info("force_retrain is set: training even though the data may be unchanged")
        return True
    if trained_on == digest:
        log.info(
            "Dataset digest %s equals the one champion %s was trained on: skipping training "
            "(set force_retrain to train anyway)",
            digest[:12],
            model_name,
        )
        return False
    log.info(
        "Dataset digest %s is new (champion: %s): training",
        digest[:12],
        (trained_on or "none")[:12],
    )
    return True


def features(split_info: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Cached base features of every image in the split (one pass serves every variant).

    The weights are resolved first: `WeightsUnavailable` (one line with the fix) before any image is read.
    """
    from leukemia.dataset import read_split
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig
    from leukemia.weights import resolve_weights

    weights = resolve_weights(str(params["weights"]))
    rows = read_split(split_info["path"])
    cfg = ModelConfig(input_size=int(params["input_size"]), weights=weights)
    result = extract_features(
        [Path(split_info["images_dir"]) / r["path"] for r in rows],
        [r["sha256"] for r in rows],
        cfg,
        data_dir() / "features",
        precision=str(params.get("precision", "auto")),
    )
    return asdict(result)


def plan(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid as flat config dicts, one per mapped training task."""
    from leukemia.training import TrainConfig, grid

    lr = params.get("learning_rate")
    base = TrainConfig.from_dict(
        {
            "epochs": int(params["epochs"]),
            "patience": int(params.get("patience", RUN_DEFAULTS.patience)),
            "learning_rate": float(lr) if lr not in (None, "", 0) else None,
            "seed": int(params.get("seed", RUN_DEFAULTS.seed)),
            "input_size": int(params["input_size"]),
            "weights": str(params["weights"]),
            "head_units": params.get("head_units", RUN_DEFAULTS.head_units),
            "dropout": float(params.get("dropout", RUN_DEFAULTS.dropout)),
        }
    )
    configs = grid(
        list(params["optimizers"]), list(params["batch_sizes"]), list(params["variants"]), base
    )
    if not configs:
        raise ValueError("the grid is empty: give at least one optimizer, batch size and variant")
    return [c.to_dict() for c in configs]


def train_one(
    config: dict[str, Any],
    split_info: dict[str, Any],
    features_info: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train and log one configuration; returns the run id, model URI and metrics."""
    from leukemia.tracking import train_run
    from leukemia.training import TrainConfig

    result = train_run(
        TrainConfig.from_dict(config),
        split_info["path"],
        split_info["images_dir"],
        features_info["cache_dir"],
        tags=tags,
        dataset_digest=split_info["digest"],
    )
    return asdict(result)


def promote(
    split_info: dict[str, Any], airflow_run_id: str | None, margin: float = 0.0
) -> dict[str, Any]:
    """Register the best-by-validation run of this DAG run and move the aliases."""
    from leukemia import registry, tracking

    experiment_id = tracking.setup()
    outcome = registry.select_and_promote(
        experiment_id, split_info["path"], split_info["images_dir"], airflow_run_id, margin=margin
    )
    return asdict(outcome)


def report(
    results: list[dict[str, Any]],
    promotion: dict[str, Any] | None,
    airflow_run_id: str | None = None,
) -> dict[str, Any]:
    """The grid's summary MLflow run (also made when selection failed)."""
    from leukemia.tracking import log_grid_summary

    return log_grid_summary(results, promotion, airflow_run_id)


def train_folder(
    images_dir: str | Path,
    cfg: Any,
    workdir: str | Path,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    precision: str = "auto",
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Split → extract → train one configuration on a local `<Class>/<name>` folder (no Airflow).

    For the CLI, benchmarks and tests; returns the split info, extraction and training results.
    """
    from leukemia.dataset import make_split, read_split
    from leukemia.features import extract_features
    from leukemia.tracking import train_run

    images_dir, workdir = Path(images_dir), Path(workdir)
    info = make_split(images_dir, workdir / "splits", fractions=fractions)
    rows = read_split(info.path)
    extracted = extract_features(
        [images_dir / r["path"] for r in rows],
        [r["sha256"] for r in rows],
        cfg.model,
        workdir / "features",
        precision=precision,
    )
    result = train_run(
        cfg, info.path, images_dir, extracted.cache_dir, tags=tags, dataset_digest=info.digest
    )
    return {"split": info, "features": extracted, "result": result, "rows": rows}
