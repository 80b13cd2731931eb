"""Configuration in one place: class names, run-time defaults and allowed values, environment settings.

Infrastructure settings come from environment variables (read when called, never at import time);
run-time choices (grid, epochs, margin) are DAG Params whose defaults and allowed values are
`RUN_DEFAULTS`, `OPTIMIZERS`, `VARIANTS`, `PRECISIONS` and `BACKENDS` here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: The four classes, in the order used by every model output, matrix and report.
CLASSES: tuple[str, ...] = ("Benign", "Early", "Pre", "Pro")
#: Early, Pre and Pro are malignant; Benign is not.
BENIGN = "Benign"

#: Optimizers a grid configuration may use (`training.make_optimizer` builds each).
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "rmsprop")
#: Feature variants: `seed` (block5 GlobalMaxPooling, the reference), `multiscale` (GAP+GMP of
#: blocks 3-5); `model.VARIANTS` says which pooled outputs each one feeds the head.
VARIANTS: tuple[str, ...] = ("seed", "multiscale")
#: Heads a grid configuration may put on the features (`model.build_head`): `mlp` (Dense 256/128/64
#: with dropout, the reference) and `linear` (standardise → softmax, L2-regularised).
HEADS: tuple[str, ...] = ("mlp", "linear")
#: Feature-extraction precisions; `auto` is bfloat16 where the CPU or GPU runs it fast.
PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
#: Feature-extraction backends (`backends.py`): `keras` (the Keras VGG16 in `PRECISIONS`), `int8` (an
#: OpenVINO int8 copy of it, calibrated on training images).
BACKENDS: tuple[str, ...] = ("keras", "int8")
#: Where fine-tuning trains from (`finetune.FineTuneConfig.source`): `activations` (VGG16's block 5 on
#: the block-4 activations the extraction cached), `pixels` (any number of blocks, from the images),
#: `auto` (activations when only block 5 is fine-tuned).
FINE_TUNE_SOURCES: tuple[str, ...] = ("auto", "activations", "pixels")


def setting_type(hint: Any) -> tuple[type, bool, bool]:
    """A setting's declared type as (scalar type, optional, sequence): `int` is (int, False,
    False), `float | None` (float, True, False), `tuple[str, ...]` (str, False, True)."""
    import typing

    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True, False
    if typing.get_origin(hint) is tuple:
        return args[0], False, True
    return hint, False, False


def setting(default: Any, title: str = "", description: str = "", **schema: Any) -> Any:
    """Declare a run setting: its default and, when `title` is given, the training DAG's Param
    (title, description, JSON-schema bounds such as `minimum`, `enum`, `items`).

    `env="VAR"` makes the Param's default that environment setting; `policy=True` marks a bound of
    the deployment's promotion policy (`policy.py`: empty means the policy, a run may only tighten).
    """
    return field(
        default=default,
        metadata={"param": {"title": title, "description": description, **schema}} if title else {},
    )


@dataclass(frozen=True)
class RunDefaults:
    """Every run-time setting, declared once: its type, default and (for the training DAG's Params)
    title, description and bounds. `tasks.params.training_params` builds the DAG's Params from this,
    `tasks.training_dag.RunRequest` (a subclass) converts a run's Params by these types, and
    `RUN_DEFAULTS` is the defaults. Adding a setting touches this class and the code that uses it.
    """

    # where the images are (the S3 Params are `tasks.params.s3_params`, shared by three DAGs)
    bucket: str = ""
    prefix: str = ""
    conn_id: str = ""
    # the grid: one training task per optimizer x batch size x variant x head
    optimizers: tuple[str, ...] = setting(
        OPTIMIZERS,
        "Optimizers",
        "One training task per optimizer × batch size × variant × head.",
        items={"enum": list(OPTIMIZERS)},
    )
    batch_sizes: tuple[int, ...] = setting((16, 32, 64), "Batch sizes", items={"minimum": 1})
    # multiscale only: seed features were never selected on the real images (validation macro-F1
    # 0.92-0.94 against 0.985-0.996, bench/quality.py) and, with 5-fold CV, would double the grid's
    # cost (bench/grid_cost.py); the reference variant stays a Param choice
    variants: tuple[str, ...] = setting(
        ("multiscale",),
        "Feature variants",
        "seed: block5 GlobalMaxPooling (the reference); multiscale: GAP+GMP of blocks 3-5.",
        items={"enum": list(VARIANTS)},
    )
    heads: tuple[str, ...] = setting(
        HEADS,
        "Heads",
        "mlp: Dense 256/128/64 with dropout (the reference); linear: standardise → softmax with an "
        "L2 penalty.",
        items={"enum": list(HEADS)},
    )
    # selection: k-fold cross-validation over train + val (1: the single train → val split), then
    # the selected configuration trained again on train + val (`refit`)
    cv_folds: int = setting(
        5,
        "Cross-validation folds",
        "Selection by mean k-fold macro-F1 over train + validation (folds grouped by content "
        "hash, stratified). 1: the single validation split.",
        minimum=1,
    )
    # on: the full grid's test errors within one image on the project split and the five
    # resplits, at 0.26-0.36x of its training compute (bench/grid_cost.py, issue 26)
    halving: bool = setting(
        True,
        "Successive halving",
        "Score every configuration on one CV fold, go on with the best third, and cross-validate "
        "only the finalists on all folds (mapped rounds train, train_round2, train_round3); the "
        "others end tagged pruned with their score. Off: every configuration on every fold.",
    )
    refit: bool = setting(
        True,
        "Refit the winner on train + validation",
        "Train the selected configuration again on train + validation for the epochs early "
        "stopping found (scaled to the larger set); that run is gated and registered.",
    )
    # calibration (calibration.py): temperature scaling and split-conformal prediction sets, fitted
    # on the held-out probabilities (out-of-fold with cross-validation, else the validation split)
    conformal_coverage: float = setting(
        0.95,
        "Conformal coverage",
        "Share of images whose prediction set must hold the true class (split-conformal, on "
        "held-out probabilities): higher refers more images to a person. Needs at least "
        "coverage / (1 - coverage) held-out images (19 at 0.95), else every image is referred.",
        exclusiveMinimum=0,
        exclusiveMaximum=1,
    )
    # every configuration
    epochs: int = setting(
        30, "Max epochs", "Early stopping on validation loss restores the best epoch.", minimum=1
    )
    patience: int = setting(5, "Early-stopping patience", minimum=1)
    learning_rate: float | None = setting(
        None,
        "Learning rate",
        "Empty: adam/rmsprop 1e-3, sgd 1e-2 with momentum.",
        exclusiveMinimum=0,
    )
    weights: str = setting(
        "imagenet",
        "VGG16 weights",
        "imagenet, a local VGG16 no-top .h5 path (air-gapped sites), or none.",
        env="LEUKEMIA_WEIGHTS",
    )
    input_size: int = setting(224, "Input size (px)", minimum=32)
    precision: str = setting(
        "auto",
        "Extraction precision",
        "auto: bfloat16 where the CPU/GPU supports it.",
        enum=list(PRECISIONS),
    )
    backend: str = setting(
        "keras",
        "Extraction backend",
        "keras: the Keras VGG16 at the precision above; int8: an OpenVINO int8 copy of it, "
        "calibrated on 300 training images (falls back to keras, in one log line, where it cannot "
        "run). Part of the feature-cache key; scoring uses the backend the model was trained on.",
        enum=list(BACKENDS),
    )
    extract_shards: int = setting(
        0,
        "Extraction shards",
        "Mapped extraction tasks, each on its own slice of the images. 0: one per 500 images (at "
        "most 64).",
        minimum=0,
    )
    # the promotion policy's bounds (policy.py): the Params are empty unless a run tightens them
    promotion_margin: float = setting(
        0.0,
        "Promotion margin",
        "test macro-F1 the candidate must gain over the champion (0: not worse)",
        policy=True,
    )
    min_f1_macro: float = setting(
        0.90, "Minimum macro-F1", "test macro-F1 a candidate must reach", policy=True
    )
    min_malignant_sensitivity: float = setting(
        0.99,
        "Minimum malignant sensitivity",
        "share of Early, Pre and Pro test images the candidate calls malignant",
        policy=True,
    )
    min_benign_specificity: float = setting(
        0.90,
        "Minimum benign specificity",
        "share of Benign test images the candidate calls benign",
        policy=True,
    )
    max_test_ece: float = setting(
        0.05,
        "Maximum test ECE",
        "expected calibration error (15 bins) of the candidate's calibrated test probabilities",
        policy=True,
    )
    require_approval: bool = setting(False, "Require approval", policy=True)
    approval_respondents: tuple[str, ...] = setting((), "Respondents", policy=True)
    # the reviewer's step (`tasks.approval.ReviewOperator`): no answer in time keeps the champion
    approval_timeout_hours: float = setting(
        72.0,
        "Approval timeout (hours)",
        "With no answer in time the champion stays (the candidate becomes challenger).",
        exclusiveMinimum=0,
    )
    max_failed_fraction: float = setting(
        0.0,
        "Tolerated failed downloads",
        "Share of listed images that may fail to download before the sync fails the run (bad "
        "images are skipped, not failed). 0: train only on a complete sync.",
        minimum=0,
        maximum=1,
    )
    # the model looks at the cells: the scale-bar overlay in the bottom-right corner is filled with
    # a constant colour inside the model (model.build_preprocess), before the VGG16 preprocessing
    mask_overlay: bool = setting(
        True,
        "Mask the scale-bar overlay",
        "Fill the bottom-right scale-bar square inside the model, so that no model reads the "
        "microscope's overlay instead of the cells (part of the feature-cache key).",
    )
    # stain and background robustness: each train and val image also trains the heads as this many
    # augmented copies (augment.py: HED stain jitter, background patches of other images, lighting),
    # extracted once with the originals and cached beside them; 0: none
    augment_copies: int = setting(
        2,
        "Augmented copies per training image",
        "Stain and background robustness: each train and validation image also trains the heads "
        "as this many copies with HED stain jitter, background patches of other images and "
        "lighting changes (extracted once, cached). 0: none.",
        minimum=0,
    )
    # after selection: the mean of the top-k heads, when it beats the best one (0 or 1: off)
    ensemble_top_k: int = setting(
        0,
        "Ensemble of the top k",
        "Register the mean of the top-k heads' softmax (one trunk, k heads) when it beats the "
        "best single head on validation macro-F1. 0 or 1: off.",
        minimum=0,
    )
    # after selection: train the last VGG16 blocks of the candidate with its head; off: on the real
    # images it made 26 test errors against the frozen default's 28 over five resplits, short of
    # issue 27's 25 % (bench/finetune_block5.py, RESULTS.md)
    fine_tune: bool = setting(
        False,
        "Fine-tune the winner",
        "Train the last VGG16 blocks of the selected model with its head: block 5 on the block-4 "
        "activations the extraction caches (minutes on a CPU), more blocks from pixels with flips "
        "and rotations (a GPU). Kept when it beats the selected model on validation.",
    )
    fine_tune_blocks: int = setting(
        1,
        "Fine-tuned VGG16 blocks",
        "How many of the last conv blocks to unfreeze: 1 = block5.",
        minimum=1,
        maximum=5,
    )
    fine_tune_source: str = setting(
        "auto",
        "Fine-tuning source",
        "activations: train block 5 and the head on the block-4 activations the extraction "
        "cached (an epoch costs about a fifth of a pass over the images; fine on CPU); pixels: "
        "from the images, any number of blocks (a GPU); auto: activations when 1 block is "
        "fine-tuned, else pixels.",
        enum=list(FINE_TUNE_SOURCES),
    )
    # Adam moves every weight by about the rate each step: on the real images (bench/
    # finetune_block5.py) 1e-5 made block 5 worse on validation after one epoch, 1e-6 better
    fine_tune_learning_rate: float = setting(
        1e-6, "Fine-tuning learning rate (Adam)", exclusiveMinimum=0
    )
    fine_tune_epochs: int = setting(
        10,
        "Fine-tuning max epochs",
        "Early stopping on validation cross-entropy (patience as above) keeps the best epoch.",
        minimum=1,
    )
    # the shortcut audit of the candidate (audit.py): one warning line per check over its limit
    audit_images: int = setting(
        200,
        "Shortcut audit: images",
        "Test images (and as many train images) the candidate's shortcut audit reads: overlay "
        "and background classifiers, patch swaps, Grad-CAM. 0: no audit.",
        minimum=0,
    )
    force_retrain: bool = setting(
        False, "Force retrain", "Train even if the data equals the champion's."
    )
    # settings without a Param: one configuration where no grid is given (the CLI, the
    # benchmarks, the tests), the head's shape, and the audit's limits
    optimizer: str = "adam"
    batch_size: int = 32
    variant: str = "seed"
    head: str = "mlp"
    head_units: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.5
    l2: float = 1e-3  # the linear head's L2 penalty per weight (sklearn's C 0.5 on ~1,600 images)
    seed: int = 42
    audit_gradcam_images: int = 16  # of the audited images, explained with Grad-CAM (costly on CPU)
    audit_region_margin: float = 0.10  # region classifier accuracy above chance
    audit_max_flip_rate: float = 0.01  # share of test predictions a patch swap may change
    audit_max_overlay_heat: float = 0.04  # Grad-CAM heat in the overlay square (2 % of the image)

    @classmethod
    def params(cls) -> dict[str, dict[str, Any]]:
        """The settings that are DAG Params: name -> title, description and schema, in order."""
        return {f.name: dict(f.metadata["param"]) for f in fields(cls) if "param" in f.metadata}


#: The one set of run-time defaults.
RUN_DEFAULTS = RunDefaults()

#: Environment variables the project reads, with their defaults and meaning (README lists them).
ENV_DEFAULTS: dict[str, tuple[str, str]] = {
    "LEUKEMIA_AWS_CONN_ID": ("aws_default", "Airflow connection id used by the S3 hook"),
    "LEUKEMIA_BUCKET": ("leukemia-images", "bucket that holds the raw images"),
    "LEUKEMIA_RAW_PREFIX": ("raw/", "prefix of <Class>/<image> objects in the bucket"),
    "LEUKEMIA_DATA_DIR": (
        "data",
        "local folder of one worker: a cache that may be empty when any task starts",
    ),
    "LEUKEMIA_WORK_URI": (
        "",
        "where tasks hand things to each other (s3:// or file://); empty: s3://<bucket>/work/",
    ),
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
    # the promotion policy (policy.py): set by the deployment; a run's conf may only tighten it
    "LEUKEMIA_MIN_F1_MACRO": (
        str(RUN_DEFAULTS.min_f1_macro),
        "promotion policy: test macro-F1 a candidate must reach to become champion",
    ),
    "LEUKEMIA_MIN_MALIGNANT_SENSITIVITY": (
        str(RUN_DEFAULTS.min_malignant_sensitivity),
        "promotion policy: share of malignant (Early, Pre, Pro) test images called malignant",
    ),
    "LEUKEMIA_MIN_BENIGN_SPECIFICITY": (
        str(RUN_DEFAULTS.min_benign_specificity),
        "promotion policy: share of Benign test images called benign",
    ),
    "LEUKEMIA_PROMOTION_MARGIN": (
        str(RUN_DEFAULTS.promotion_margin),
        "promotion policy: test macro-F1 a candidate must gain over the champion",
    ),
    "LEUKEMIA_MAX_TEST_ECE": (
        str(RUN_DEFAULTS.max_test_ece),
        "promotion policy: largest expected calibration error of a candidate's test probabilities",
    ),
    "LEUKEMIA_REQUIRE_APPROVAL": (
        "false",
        "promotion policy: a person approves each candidate that passed the gate",
    ),
    "LEUKEMIA_APPROVAL_RESPONDENTS": (
        "",
        "promotion policy: Airflow users who may approve, comma-separated (empty: any user who "
        "may act on the training DAG)",
    ),
    "LEUKEMIA_TRAINING_MLFLOW_USERNAME": (
        "",
        "the MLflow login that registers and promotes models; versions registered by any other "
        "login are never loaded or promoted (empty: MLFLOW_TRACKING_USERNAME outside the scoring "
        "login; 'local' on a store without logins)",
    ),
    "LEUKEMIA_AIRFLOW_API_URL": (
        "",
        "Airflow REST API the CLI's champion rollback notifies (e.g. http://localhost:8080)",
    ),
    "LEUKEMIA_AIRFLOW_USERNAME": ("", "Airflow login of the CLI's champion rollback"),
    "LEUKEMIA_AIRFLOW_PASSWORD": ("", "password of LEUKEMIA_AIRFLOW_USERNAME"),
    # the review of referred images (review.py, the leukemia_review DAG)
    "LEUKEMIA_REVIEW_PREFIX": (
        "review/",
        "prefix in the bucket of the review queue (queue/), forms (forms/) and answers (done/)",
    ),
    "LEUKEMIA_REVIEW_BATCH": ("10", "most images one review form asks about"),
    "LEUKEMIA_REVIEW_TIMEOUT_HOURS": (
        "24",
        "hours a review form waits for an answer; then its images return to the queue",
    ),
    "LEUKEMIA_REVIEW_LINK_HOURS": (
        "168",
        "hours the pre-signed image and Grad-CAM links of a review form stay valid",
    ),
    # the drift watch of scoring (watch.py, drift.py): the reference is fitted at registration
    "LEUKEMIA_DRIFT_REFERENCE_SAMPLE": (
        "500",
        "training feature vectors stored with a registered version for the drift test",
    ),
    "LEUKEMIA_OOD_FPR": (
        "0.01",
        "share of in-distribution images the per-image out-of-distribution flag refers (its "
        "threshold is fitted on the training features at registration)",
    ),
    "LEUKEMIA_DRIFT_MIN_BATCH": (
        "20",
        "fewest images a scoring run needs for a drift decision (fewer: none; OOD scores still given)",
    ),
    "LEUKEMIA_DRIFT_ALPHA": ("0.01", "significance level of a scoring run's drift test"),
    "LEUKEMIA_DRIFT_MAX_IMAGES": (
        "1000",
        "most images of one scoring run the drift test compares (a seeded sample of the run's)",
    ),
    # alerts (alerts.py): the deployment's, never a run's; no recipient and no webhook: no alerts
    "LEUKEMIA_ALERT_EMAILS": ("", "alert e-mail recipients, comma-separated (empty: no e-mail)"),
    "LEUKEMIA_ALERT_SMTP_CONN_ID": (
        "smtp_default",
        "Airflow SMTP connection the alert e-mails go through",
    ),
    "LEUKEMIA_ALERT_FROM": ("", "sender of the alert e-mails (empty: the connection's from_email)"),
    "LEUKEMIA_ALERT_WEBHOOK_URL": ("", "http(s) URL each alert is POSTed to as JSON (empty: none)"),
    "LEUKEMIA_ALERT_ATTEMPTS": ("3", "tries per alert and channel before the failure is logged"),
    "LEUKEMIA_ALERT_BACKOFF_SECONDS": (
        "0.5",
        "wait before an alert's second try, doubled before each further one",
    ),
    "LEUKEMIA_ALERT_TIMEOUT_SECONDS": (
        "3",
        "longest wait for the SMTP server or the webhook in one try",
    ),
    "LEUKEMIA_TRAINING_DEADLINE_HOURS": (
        "24",
        "a training run not finished this many hours after it was queued sends a deadline alert "
        "(0: none)",
    ),
}

#: MLflow's client reads the login from these on every request.
MLFLOW_LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
TRAINING_LOGIN = "LEUKEMIA_TRAINING_MLFLOW_USERNAME"


def env(name: str) -> str:
    """Return environment variable `name`, or its documented default."""
    if name not in ENV_DEFAULTS:
        raise KeyError(f"unknown setting {name}: known settings are {', '.join(ENV_DEFAULTS)}")
    return os.environ.get(name) or ENV_DEFAULTS[name][0]


def env_flag(name: str) -> bool:
    """A boolean setting: true for 1, true, yes or on (any case)."""
    return env(name).strip().lower() in ("1", "true", "yes", "on")


def data_dir() -> Path:
    """Local working folder (created on demand by the callers that write into it)."""
    return Path(env("LEUKEMIA_DATA_DIR")).expanduser().resolve()


def work_uri(bucket: str | None = None) -> str:
    """The work store: `LEUKEMIA_WORK_URI`, else `s3://<bucket>/work/` (default bucket: the setting).

    Everything one task hands to another lives there (sync manifest, split, feature shards, grid
    report), so no task depends on a file another task left on a worker's disk.
    """
    uri = env("LEUKEMIA_WORK_URI")
    if not uri:
        uri = f"s3://{bucket or env('LEUKEMIA_BUCKET')}/work/"
    return uri if uri.endswith("/") else uri + "/"


def project_root() -> Path:
    """The project checkout: the nearest folder above this library that holds `dags/`.

    The local stack (`make demo`, the tests) serves that folder's DAGs and plugins and writes under
    its `data/`; found by looking up, so it does not depend on how deep this file sits.
    """
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "dags").is_dir():
            return folder
    raise FileNotFoundError(
        f"no folder holding dags/ above {here}: run the demo from a checkout of the project "
        "(git clone, then make demo), not from an installed copy of the library"
    )


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


def mlflow_identity() -> str:
    """The MLflow login this process talks as (MLFLOW_TRACKING_USERNAME), 'local' without one."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or "local"


def training_identity() -> str:
    """The MLflow login that registers and promotes models: LEUKEMIA_TRAINING_MLFLOW_USERNAME,
    else this process's login outside `scoring_mlflow_login` ('local' on a store without logins)."""
    return env("LEUKEMIA_TRAINING_MLFLOW_USERNAME") or mlflow_identity()


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
    saved = {name: os.environ.get(name) for name in (*MLFLOW_LOGIN_VARIABLES, TRAINING_LOGIN)}
    os.environ[TRAINING_LOGIN] = training_identity()  # whose versions may be loaded: unchanged
    os.environ.update(dict(zip(MLFLOW_LOGIN_VARIABLES, (username, password), strict=True)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
