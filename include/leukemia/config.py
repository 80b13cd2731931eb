"""Configuration in one place: class names, environment settings with documented defaults.

Infrastructure settings come from environment variables (read when called, never at import time);
run-time choices (grid, epochs, margin) are DAG Params that end up in the frozen dataclasses here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: The four classes, in the order used by every model output, matrix and report.
CLASSES: tuple[str, ...] = ("Benign", "Early", "Pre", "Pro")
#: Early, Pre and Pro are malignant; Benign is not.
BENIGN = "Benign"

#: Environment variables the project reads, with their defaults and meaning (README lists them).
ENV_DEFAULTS: dict[str, tuple[str, str]] = {
    "LEUKEMIA_AWS_CONN_ID": ("aws_default", "Airflow connection id used by the S3 hook"),
    "LEUKEMIA_BUCKET": ("leukemia-images", "bucket that holds the raw images"),
    "LEUKEMIA_RAW_PREFIX": ("raw/", "prefix of <Class>/<image> objects in the bucket"),
    "LEUKEMIA_DATA_DIR": ("data", "local working folder: images, manifests, feature cache"),
    "LEUKEMIA_MAX_IMAGE_BYTES": (
        "50000000",
        "largest image object or file read, in bytes (checked before reading it)",
    ),
    "LEUKEMIA_MAX_IMAGE_PIXELS": (
        "25000000",
        "largest image decoded, width x height (checked from its header before decoding)",
    ),
    "LEUKEMIA_WEIGHTS": ("imagenet", "VGG16 base weights: imagenet, a .h5 path, or none"),
    "LEUKEMIA_MODEL_NAME": ("leukemia-classifier", "MLflow registered model name"),
    "LEUKEMIA_EXPERIMENT": ("leukemia-vgg16", "MLflow experiment for the training runs"),
    "LEUKEMIA_TRAINING_QUEUE": ("default", "Celery queue of the training tasks"),
    "LEUKEMIA_TRAINING_SLOTS": ("1", "training tasks that may run at once in one DAG run"),
    "LEUKEMIA_MLFLOW_UI_URL": (
        "",
        "MLflow UI address for links (default: the tracking URI if http)",
    ),
}


def env(name: str) -> str:
    """Return environment variable `name`, or its documented default."""
    if name not in ENV_DEFAULTS:
        raise KeyError(f"unknown setting {name}: known settings are {', '.join(ENV_DEFAULTS)}")
    return os.environ.get(name) or ENV_DEFAULTS[name][0]


def data_dir() -> Path:
    """Local working folder (created on demand by the callers that write into it)."""
    return Path(env("LEUKEMIA_DATA_DIR")).expanduser().resolve()


def tracking_uri() -> str:
    """MLflow tracking URI: `MLFLOW_TRACKING_URI`, else a SQLite store in the data folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{data_dir() / 'mlflow.db'}"


@dataclass(frozen=True)
class StorageConfig:
    """Where the raw images live on S3 and where they are synced to."""

    bucket: str
    prefix: str = "raw/"
    conn_id: str = "aws_default"
    local_dir: Path = field(default_factory=lambda: data_dir() / "images")

    @classmethod
    def from_env(cls, **overrides: object) -> StorageConfig:
        """Build from the environment; keyword arguments that are not None win."""
        values: dict[str, object] = {
            "bucket": env("LEUKEMIA_BUCKET"),
            "prefix": env("LEUKEMIA_RAW_PREFIX"),
            "conn_id": env("LEUKEMIA_AWS_CONN_ID"),
            "local_dir": data_dir() / "images",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["local_dir"] = Path(str(values["local_dir"]))
        return cls(**values)  # type: ignore[arg-type]


def mlflow_ui_url() -> str:
    """Base address of the MLflow UI that task links point to."""
    explicit = env("LEUKEMIA_MLFLOW_UI_URL")
    if explicit:
        return explicit.rstrip("/")
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
