"""The steps of the `leukemia_training` DAG: one function per task, typed values in, small dicts out.

The DAG turns its Params into one `RunRequest` (the only place a Params mapping is read) and calls
one function here per task, so every step runs and is tested without Airflow; XCom carries only what
these return (paths, ids, URIs, metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from leukemia.config import RUN_DEFAULTS, StorageConfig, data_dir, env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """What one training DAG run was asked to do: its Params, typed, with the config's defaults."""

    bucket: str = ""
    prefix: str = ""
    conn_id: str = ""
    optimizers: tuple[str, ...] = RUN_DEFAULTS.optimizers
    batch_sizes: tuple[int, ...] = RUN_DEFAULTS.batch_sizes
    variants: tuple[str, ...] = RUN_DEFAULTS.variants
    epochs: int = RUN_DEFAULTS.epochs
    patience: int = RUN_DEFAULTS.patience
    learning_rate: float | None = RUN_DEFAULTS.learning_rate
    seed: int = RUN_DEFAULTS.seed
    weights: str = "imagenet"
    input_size: int = RUN_DEFAULTS.input_size
    head_units: tuple[int, ...] = RUN_DEFAULTS.head_units
    dropout: float = RUN_DEFAULTS.dropout
    precision: str = RUN_DEFAULTS.precision
    promotion_margin: float = RUN_DEFAULTS.promotion_margin
    max_failed_fraction: float = RUN_DEFAULTS.max_failed_fraction
    force_retrain: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RunRequest:
        """Convert a DAG run's Params (absent keys: defaults; `weights`: LEUKEMIA_WEIGHTS) once."""
        values: dict[str, Any] = {"weights": env("LEUKEMIA_WEIGHTS")}
        for f in fields(cls):
            if f.name not in params or params[f.name] is None:
                continue
            value = params[f.name]
            if f.name in ("optimizers", "variants"):
                value = tuple(str(v) for v in value)
            elif f.name in ("batch_sizes", "head_units"):
                value = tuple(int(v) for v in value)
            elif f.name == "learning_rate":
                value = float(value) if value not in ("", 0) else None
            elif f.name == "force_retrain":
                value = bool(value)
            else:
                value = type(getattr(RUN_DEFAULTS, f.name, f.default))(value)
            values[f.name] = value
        return cls(**values)


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


def features(split_info: dict[str, Any], request: RunRequest) -> dict[str, Any]:
    """Cached base features of every image in the split (one pass serves every variant).

    The weights are resolved first: `WeightsUnavailable` (one line with the fix) before any image is read.
    """
    from leukemia.dataset import read_split
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig
    from leukemia.weights import resolve_weights

    weights = resolve_weights(request.weights)
    rows = read_split(split_info["path"])
    cfg = ModelConfig(input_size=request.input_size, weights=weights)
    result = extract_features(
        [Path(split_info["images_dir"]) / r["path"] for r in rows],
        [r["sha256"] for r in rows],
        cfg,
        data_dir() / "features",
        precision=request.precision,
    )
    return asdict(result)


def plan(request: RunRequest) -> list[dict[str, Any]]:
    """The grid as flat config dicts, one per mapped training task."""
    from leukemia.training import TrainConfig, grid

    base = TrainConfig.from_dict(
        {
            "epochs": request.epochs,
            "patience": request.patience,
            "learning_rate": request.learning_rate,
            "seed": request.seed,
            "input_size": request.input_size,
            "weights": request.weights,
            "head_units": request.head_units,
            "dropout": request.dropout,
        }
    )
    configs = grid(
        list(request.optimizers), list(request.batch_sizes), list(request.variants), base
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
