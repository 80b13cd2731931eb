"""Configuration in one place: class names, environment settings with documented defaults.

Infrastructure settings come from environment variables (read when called, never at import time);
run-time choices (grid, epochs, margin) are DAG Params that end up in the frozen dataclasses here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    "LEUKEMIA_SCORING_MLFLOW_USERNAME": (
        "",
        "read-only MLflow user of the scoring tasks (empty: MLFLOW_TRACKING_USERNAME)",
    ),
    "LEUKEMIA_SCORING_MLFLOW_PASSWORD": ("", "password of LEUKEMIA_SCORING_MLFLOW_USERNAME"),
}

#: MLflow's client reads the login from these on every request.
MLFLOW_LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


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


@contextmanager
def scoring_mlflow_login() -> Iterator[None]:
    """Inside the block, talk to MLflow as the read-only scoring user, when one is configured.

    The compose stack logs tasks in as the training user (`MLFLOW_TRACKING_USERNAME`, which may
    move `@champion`) and names the scoring user in `LEUKEMIA_SCORING_MLFLOW_*`; scoring runs in
    this block so that it cannot change the registry, even by mistake. Without
    `LEUKEMIA_SCORING_MLFLOW_USERNAME` nothing changes. The previous login is restored on exit.
    """
    username = env("LEUKEMIA_SCORING_MLFLOW_USERNAME")
    if not username:
        yield
        return
    password = env("LEUKEMIA_SCORING_MLFLOW_PASSWORD")
    if not password:
        raise ValueError(
            "LEUKEMIA_SCORING_MLFLOW_USERNAME is set but LEUKEMIA_SCORING_MLFLOW_PASSWORD is empty: "
            "set both (the compose stack takes them from MLFLOW_SCORING_USERNAME/PASSWORD in .env) "
            "or neither"
        )
    saved = {name: os.environ.get(name) for name in MLFLOW_LOGIN_VARIABLES}
    os.environ.update(dict(zip(MLFLOW_LOGIN_VARIABLES, (username, password), strict=True)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
