"""Fitting the head of one grid configuration on cached features; nothing here knows of MLflow.

`fit_head` is the pure core (arrays in, Keras head and history out); `split_arrays` reads the cached
features of each split; `grid` expands the optimizer × batch size × variant × head grid;
`cv_folds` and `cross_validate` score a configuration by k-fold cross-validation over train + val.
Driving one configuration as an MLflow run is `runs.train_run`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES, OPTIMIZERS, RUN_DEFAULTS
from leukemia.model import ModelConfig

log = logging.getLogger(__name__)

#: Learning rates used when none is given: Keras' defaults, SGD with momentum at 0.01.
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "rmsprop": 1e-3}


@dataclass(frozen=True)
class TrainConfig:
    """One grid configuration."""

    optimizer: str = RUN_DEFAULTS.optimizer
    batch_size: int = RUN_DEFAULTS.batch_size
    learning_rate: float | None = RUN_DEFAULTS.learning_rate
    epochs: int = RUN_DEFAULTS.epochs
    patience: int = RUN_DEFAULTS.patience
    seed: int = RUN_DEFAULTS.seed
    cv_folds: int = RUN_DEFAULTS.cv_folds  # k-fold CV over train + val for selection; 1: none
    augment_copies: int = RUN_DEFAULTS.augment_copies  # augmented copies per training image
    conformal_coverage: float = RUN_DEFAULTS.conformal_coverage  # of the prediction sets
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.batch_size < 1 or self.epochs < 1 or self.cv_folds < 1:
            raise ValueError(
                "batch_size, epochs and cv_folds must be >= 1, got "
                f"{self.batch_size}, {self.epochs}, {self.cv_folds}"
            )
        if self.augment_copies < 0:
            raise ValueError(f"augment_copies must be >= 0, got {self.augment_copies}")
        if not 0 < self.conformal_coverage < 1:
            raise ValueError(
                f"conformal_coverage must be between 0 and 1 (exclusive), got "
                f"{self.conformal_coverage}: e.g. 0.95"
            )

    @property
    def lr(self) -> float:
        return self.learning_rate or DEFAULT_LR[self.optimizer]

    @property
    def name(self) -> str:
        """Short label, e.g. `adam · bs64 · multiscale` or `adam · bs64 · multiscale · linear` (the
        grid view's map index; the reference `mlp` head is not named)."""
        return config_label(self.optimizer, self.batch_size, self.model.variant, self.model.head)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a flat dict (Airflow XCom / Params): model keys go to ModelConfig."""
        model_keys = set(ModelConfig.__dataclass_fields__)
        model = {k: v for k, v in values.items() if k in model_keys}
        if "head_units" in model:
            model["head_units"] = tuple(int(u) for u in model["head_units"])
        rest = {k: v for k, v in values.items() if k in cls.__dataclass_fields__ and k != "model"}
        return cls(model=ModelConfig(**model), **rest)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict, the inverse of `from_dict`."""
        out = {k: v for k, v in asdict(self).items() if k != "model"}
        out.update(asdict(self.model))
        out["head_units"] = list(self.model.head_units)
        return out


def config_label(optimizer: str, batch_size: int, variant: str, head: str = "mlp") -> str:
    """`TrainConfig.name` from its parts (the DAG labels mapped tasks from a config dict with it)."""
    label = f"{optimizer} · bs{batch_size} · {variant}"
    return label if head == "mlp" else f"{label} · {head}"


def make_optimizer(name: str, learning_rate: float) -> Any:
    """A fresh Keras optimizer. SGD gets Nesterov momentum (plain SGD crawls on this head) and
    gradient-norm clipping (at batch 16 its first steps on 2,560 features overshoot and early
    stopping then keeps a poor epoch: measured val macro-F1 0.66 without, 0.98 with)."""
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, clipnorm=1.0)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def _train_step(head: Any, optimizer: Any, width: int) -> Callable[[Any, Any], Any]:
    """One compiled optimisation step for any batch size: traced once, not once per batch shape."""
    import keras
    import tensorflow as tf

    optimizer.build(head.trainable_variables)
    spec = (tf.TensorSpec([None, width], tf.float32), tf.TensorSpec([None], tf.int64))

    @tf.function(input_signature=spec)
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            probs = head(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, probs))
            penalty = head.losses  # the linear head's L2 term; none for the mlp head
            objective = loss + tf.add_n(penalty) if penalty else loss
        grads = tape.gradient(objective, head.trainable_variables)
        optimizer.apply(grads, head.trainable_variables)
        correct = tf.reduce_sum(tf.cast(tf.argmax(probs, axis=1) == y, tf.float32))
        return tf.stack([loss * tf.cast(tf.shape(y)[0], tf.float32), correct])

    return step


def _loss_and_accuracy(head: Any, x: Any, y: Any) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the head (inference mode) on a whole split."""
    import keras
    import numpy as np

    probs = np.asarray(head(x, training=False))
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, probs)))
    return loss, float(np.mean(probs.argmax(axis=1) == y))


def fit_head(
    cfg: TrainConfig,
    x_train: Any,
    y_train: Any,
    x_val: Any | None,
    y_val: Any | None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Train the head on features: standardised input, early stopping on val_loss, best weights kept.

    Without a validation split (`x_val` None: the refit on train + val) it trains exactly
    `cfg.epochs` epochs and keeps the last weights. Seeded: the same inputs and configuration give
    the same weights. The loop is Keras' `fit` reduced to what a small head on cached features needs
    (one traced step for every batch size, the validation split in one call): `fit`'s
    per-configuration tracing and callback machinery cost about 1 s, more than the training itself
    on a few hundred images (bench/sweep.py). The returned head is compiled, so `evaluate` and
    `predict` work as usual.
    """
    import keras
    import numpy as np

    from leukemia.model import adapted_normalization, build_head

    x_train = np.asarray(x_train, dtype="float32")
    y_train = np.asarray(y_train, dtype="int64")
    validate = x_val is not None
    if validate:
        x_val = np.asarray(x_val, dtype="float32")
        y_val = np.asarray(y_val, dtype="int64")
    keras.utils.set_random_seed(cfg.seed)
    head = build_head(cfg.model, adapted_normalization(x_train))
    optimizer = make_optimizer(cfg.optimizer, cfg.lr)
    head.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    step = _train_step(head, optimizer, x_train.shape[1])
    order_rng = np.random.default_rng(cfg.seed)
    keys = ("loss", "accuracy", "val_loss", "val_accuracy") if validate else ("loss", "accuracy")
    history: dict[str, list[float]] = {k: [] for k in keys}
    best_loss, best_weights, waited = float("inf"), head.get_weights(), 0
    for epoch in range(cfg.epochs):
        order = order_rng.permutation(len(x_train))
        totals = sum(
            step(x_train[batch], y_train[batch])
            for batch in np.array_split(order, range(cfg.batch_size, len(order), cfg.batch_size))
        )
        loss_sum, correct = np.asarray(totals, dtype="float64")
        logs = {"loss": loss_sum / len(x_train), "accuracy": correct / len(x_train)}
        if validate:
            logs["val_loss"], logs["val_accuracy"] = _loss_and_accuracy(head, x_val, y_val)
        for key, value in logs.items():
            history[key].append(value)
        log.info(
            "%s epoch %d/%d: %s",
            cfg.name,
            epoch + 1,
            cfg.epochs,
            " ".join(f"{k} {v:.4f}" for k, v in logs.items()),
        )
        if on_epoch is not None:
            on_epoch(epoch, logs)
        if not validate:
            continue
        if logs["val_loss"] < best_loss:
            best_loss, best_weights, waited = logs["val_loss"], head.get_weights(), 0
        else:
            waited += 1
            if waited >= cfg.patience:
                log.info(
                    "%s: early stop after epoch %d, best val_loss %.4f",
                    cfg.name,
                    epoch + 1,
                    best_loss,
                )
                break
    if validate:
        head.set_weights(best_weights)
    return head, history


def best_epoch(history: Mapping[str, Sequence[float]]) -> int:
    """The epoch (1-based) whose weights early stopping kept: the first lowest val_loss, a NaN never
    counting as lower (as in `fit_head` and Keras' `EarlyStopping`); the last epoch when there is
    no validation loss (the refit keeps its last weights). The one definition: the CV folds, the
    runs' `best_epoch` metric and the training-curves figure all use it."""
    finite = [
        (float(v), i) for i, v in enumerate(history.get("val_loss") or []) if math.isfinite(v)
    ]
    if not finite:
        return len(history.get("loss", []))
    return min(finite)[1] + 1


def cv_folds(
    y: Any, groups: list[str], k: int, seed: int = RUN_DEFAULTS.seed
) -> list[tuple[Any, Any]]:
    """k (train, val) index pairs, stratified by class and grouped by `groups` (content hashes:
    identical images never sit on both sides); shuffled with `seed`, so the same for every
    configuration of a grid."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y)
    groups_n = len(set(groups))
    if k < 2 or groups_n < k:
        raise ValueError(
            f"{k}-fold cross-validation needs k >= 2 and at least k distinct images, "
            f"got {groups_n}: lower cv_folds (1: the single train → val split)"
        )
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(y)), y, groups))


def usable_folds(y: Any, groups: list[str], k: int) -> int:
    """The folds k-fold CV can have on these images: `k`, or fewer when no class has `k` distinct
    images (a stratified split needs one that has; a smaller class then sits out some folds, as
    scikit-learn warns); 1: no CV."""
    per_class: dict[Any, set[str]] = {}
    for label, group in zip(list(y), groups, strict=True):
        per_class.setdefault(label, set()).add(group)
    return max(1, min(k, max((len(g) for g in per_class.values()), default=1)))


#: Per-fold metrics `cross_validate` reports (and `runs.train_run` logs as `cv_<name>_mean/_std`).
CV_METRICS = ("f1_macro", "log_loss", "accuracy", "best_epoch")


def with_copies(x: Any, y: Any, copies: Any | None) -> tuple[Any, Any]:
    """Training rows and labels with their augmented copies (`copies`: (c, n, width) rows of the
    same images, or None) appended, each copy with its image's label."""
    import numpy as np

    if copies is None or not len(copies):
        return x, y
    width = np.shape(x)[1]
    return (
        np.concatenate([np.asarray(x), np.asarray(copies).reshape(-1, width)]),
        np.tile(np.asarray(y), len(copies) + 1),
    )


def cross_validate(
    cfg: TrainConfig,
    x: Any,
    y: Any,
    groups: list[str],
    k: int | None = None,
    copies: Any | None = None,
    only: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Fit the configuration on each of k folds of (x, y) (train + val) and score it on the held-out
    fold, early stopping on that fold as the single split does. `copies` (c, n, width): the images'
    augmented copies, added to the training folds only (a held-out image is scored as it is).
    `only`: the folds to fit (0-based; successive halving fits a few per round), default all.

    Returns `folds` (one metrics dict per fold fitted: `number` (1-based), f1_macro, log_loss,
    accuracy, best_epoch, images), `<metric>_mean` / `<metric>_std` over them, and `oof`: every
    image's probabilities from the fold that held it out (in the order of `x`; zero for the images
    of folds not fitted).
    """
    import numpy as np

    from leukemia.evaluation import evaluate

    x, y = np.asarray(x, dtype="float32"), np.asarray(y, dtype="int64")
    folds, held = [], []
    oof = np.zeros((len(y), len(CLASSES)), dtype="float32")
    for number, (train_idx, val_idx) in enumerate(cv_folds(y, groups, k or cfg.cv_folds, cfg.seed)):
        if only is not None and number not in only:
            continue
        fold_copies = None if copies is None else np.asarray(copies)[:, train_idx]
        head, history = fit_head(
            cfg, *with_copies(x[train_idx], y[train_idx], fold_copies), x[val_idx], y[val_idx]
        )
        oof[val_idx] = np.asarray(head(x[val_idx], training=False))
        held.extend(int(i) for i in val_idx)
        metrics = evaluate(y[val_idx], oof[val_idx])["metrics"]
        folds.append(
            {
                "number": number + 1,
                **{m: metrics[m] for m in CV_METRICS if m in metrics},
                "best_epoch": best_epoch(history),
                "images": len(val_idx),
            }
        )
    return {"folds": folds, "oof": oof, "held_out": held, **fold_summary(folds)}


def fold_summary(folds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """`<metric>_mean` and `<metric>_std` of `CV_METRICS` over folds (`cross_validate`'s `folds`)."""
    import numpy as np

    out = {}
    for m in CV_METRICS:
        values = np.asarray([f[m] for f in folds], dtype="float64")
        out[f"{m}_mean"], out[f"{m}_std"] = float(values.mean()), float(values.std())
    return out


def split_arrays(
    rows: list[dict[str, str]], cache_dir: str | Path, variant: str
) -> dict[str, tuple[Any, Any, list[dict[str, str]]]]:
    """Features, labels and rows of each split, from the split rows and the feature cache (one read
    of the variant's arrays for all three splits)."""
    from leukemia.features import labels_to_index, load_features

    parts = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    empty = [s for s, part in parts.items() if not part]
    if empty:
        raise ValueError(
            f"the split has no {' and no '.join(empty)} images: add images or change the fractions"
        )
    ordered = [r for part in parts.values() for r in part]
    x = load_features(cache_dir, [r["sha256"] for r in ordered], variant)
    out, start = {}, 0
    for split, part in parts.items():
        out[split] = (
            x[start : start + len(part)],
            labels_to_index([r["label"] for r in part]),
            part,
        )
        start += len(part)
    return out


def copy_arrays(
    data: dict[str, tuple[Any, Any, list[dict[str, str]]]],
    cache_dir: str | Path,
    variant: str,
    copies: int,
) -> dict[str, Any]:
    """The augmented copies of the train and val images (`split_arrays`' order): split →
    (copies, n, width), read in one pass per copy; the test split is never augmented."""
    from leukemia.dataset import TRAINING_SPLITS
    from leukemia.features import load_copies

    shas = [r["sha256"] for s in TRAINING_SPLITS for r in data[s][2]]
    both = load_copies(cache_dir, shas, variant, copies)
    n_train = len(data["train"][2])
    return {"train": both[:, :n_train], "val": both[:, n_train:]}


def grid(
    optimizers: list[str],
    batch_sizes: list[int],
    variants: list[str],
    base: TrainConfig,
    heads: list[str] | None = None,
) -> list[TrainConfig]:
    """Every (optimizer, batch size, variant, head) combination over a base configuration (heads:
    the base's head when not given)."""
    return [
        replace(base, optimizer=o, batch_size=int(b), model=replace(base.model, variant=v, head=h))
        for h in heads or [base.model.head]
        for v in variants
        for o in optimizers
        for b in batch_sizes
    ]
