"""Fine-tuning the selected model from pixels: its last VGG16 block(s) unfrozen, a low learning rate.

Everywhere else the trunk is frozen and only heads are trained, on cached features. Fine-tuning
starts from a selected run (its configuration and trained head), unfreezes the last `blocks` conv
blocks of VGG16 (1: block5), and trains trunk blocks and head together with Adam at a low learning
rate on the training split's images, read from the images store (a folder or an `s3://` prefix),
with flips and small rotations as augmentation, early stopping on the validation loss (best epoch
kept). The augmentation is stock Keras layers inside the model (`model.assemble(augment=...)`),
after the overlay mask, and does nothing at inference, so the model that is logged takes raw pixels
and loads in Keras' safe mode like every other. The stain and background copies of the cached-feature
grid (`augment.py`, `augment_copies`) are not used here: they exist as features, not as images.

It trains the whole VGG16 forward and the top blocks backward on every image of every epoch: meant
for a worker with a GPU (the `training` queue), and off by default (Param `fine_tune`).
`fine_tune_candidate` decides whether the fine-tuned run replaces the selected candidate.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from leukemia.config import RUN_DEFAULTS
from leukemia.model import ModelConfig

log = logging.getLogger(__name__)

#: VGG16's conv blocks, first to last (layer names start with these).
VGG_BLOCKS = ("block1", "block2", "block3", "block4", "block5")


@dataclass(frozen=True)
class FineTuneConfig:
    """How the selected model is fine-tuned."""

    blocks: int = RUN_DEFAULTS.fine_tune_blocks  # the last n conv blocks are trained: 1 = block5
    learning_rate: float = RUN_DEFAULTS.fine_tune_learning_rate
    epochs: int = RUN_DEFAULTS.fine_tune_epochs
    patience: int = RUN_DEFAULTS.patience
    batch_size: int = 32
    rotation: float = 0.1  # RandomRotation factor: up to ±0.1 of a full turn (36°)
    seed: int = RUN_DEFAULTS.seed

    def __post_init__(self) -> None:
        if not 1 <= self.blocks <= len(VGG_BLOCKS):
            raise ValueError(f"blocks must be 1-{len(VGG_BLOCKS)} (1 = block5), got {self.blocks}")
        if self.learning_rate <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                "learning_rate must be > 0 and epochs, batch_size >= 1, got "
                f"{self.learning_rate}, {self.epochs}, {self.batch_size}"
            )

    @property
    def unfrozen(self) -> tuple[str, ...]:
        """The VGG16 blocks that train, e.g. ('block5',)."""
        return VGG_BLOCKS[-self.blocks :]


def augmentation_layers(rotation: float, seed: int) -> list[Any]:
    """Random flips (both axes) and rotations: stock layers, active only while training."""
    import keras

    return [
        keras.layers.RandomFlip("horizontal_and_vertical", seed=seed, name="augment_flip"),
        keras.layers.RandomRotation(
            rotation, fill_mode="reflect", seed=seed + 1, name="augment_rotation"
        ),
    ]


def build_finetune_model(cfg: ModelConfig, head: Any, ft: FineTuneConfig) -> Any:
    """The full model (`model.assemble`) with augmentation, and only `ft.unfrozen` blocks of the
    trunk trainable (with the head); the preprocessing stays fixed."""
    from leukemia.model import assemble, build_trunk

    trunk = build_trunk(cfg)
    trunk.trainable = True  # sets every layer; then freeze all but the last blocks
    for layer in trunk.layers:
        layer.trainable = layer.name.startswith(ft.unfrozen)
    return assemble(cfg, trunk, head, augment=augmentation_layers(ft.rotation, ft.seed))


def read_pixels(
    rows: list[dict[str, str]], images_dir: str | Path, size: int, split: str
) -> tuple[Any, Any]:
    """One split's images as uint8 pixels (n, size, size, 3) and their class indices.

    uint8 holds `images.load_image`'s pixels exactly (integers 0-255) in a quarter of the memory.
    """
    import numpy as np

    from leukemia.features import iter_image_batches, labels_to_index
    from leukemia.objectstore import join

    part = [r for r in rows if r["split"] == split]
    paths = [join(images_dir, r["path"]) for r in part]
    x = np.zeros((len(part), size, size, 3), dtype="uint8")
    start = 0
    for batch in iter_image_batches(paths, size, 64):
        x[start : start + len(batch)] = batch.astype("uint8")
        start += len(batch)
    return x, labels_to_index([r["label"] for r in part])


def _dataset(x: Any, y: Any, batch_size: int, shuffle_seed: int | None = None) -> Any:
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle_seed is not None:
        data = data.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size).map(lambda a, b: (tf.cast(a, tf.float32), b))
    return data.prefetch(tf.data.AUTOTUNE)


def fit_pixels(
    model: Any,
    ft: FineTuneConfig,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Train `model` (from `build_finetune_model`) on pixels: Adam at `ft.learning_rate`, early
    stopping on validation loss with the best epoch's weights kept; each epoch is logged."""
    import keras

    keras.utils.set_random_seed(ft.seed)
    model.compile(
        optimizer=keras.optimizers.Adam(ft.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    started = time.monotonic()

    def epoch_end(epoch: int, logs: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in (logs or {}).items()}
        log.info(
            "Fine-tuning epoch %d/%d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f (%.0fs)",
            epoch + 1,
            ft.epochs,
            values.get("loss", float("nan")),
            values.get("accuracy", float("nan")),
            values.get("val_loss", float("nan")),
            values.get("val_accuracy", float("nan")),
            time.monotonic() - started,
        )
        if on_epoch is not None:
            on_epoch(epoch, values)

    history = model.fit(
        _dataset(x_train, y_train, ft.batch_size, shuffle_seed=ft.seed),
        validation_data=_dataset(x_val, y_val, ft.batch_size),
        epochs=ft.epochs,
        shuffle=False,  # the dataset is shuffled, seeded, every epoch
        verbose=0,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=ft.patience, restore_best_weights=True
            ),
            keras.callbacks.LambdaCallback(on_epoch_end=epoch_end),
        ],
    )
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def predict_pixels(model: Any, x: Any, batch_size: int = 32) -> Any:
    """Class probabilities of uint8 pixels, in inference mode (augmentation off)."""
    import numpy as np

    if not len(x):
        return np.zeros((0, 4), dtype="float32")
    return np.asarray(model.predict(_dataset(x, np.zeros(len(x)), batch_size), verbose=0))


def _run_params(ft: FineTuneConfig, source: Any) -> dict[str, Any]:
    """The fine-tuning run's params: the fine-tuning settings beside the source run's own."""
    return {
        **{f"fine_tune_{k}": v for k, v in asdict(ft).items()},
        "fine_tune_unfrozen": ",".join(ft.unfrozen),
        "source_run_id": source.info.run_id,
        **{k: v for k, v in source.data.params.items() if k != "epochs_run"},
    }


def _prepare(
    source_run_id: str, split_path: str | Path, images_dir: str | Path, ft: FineTuneConfig
) -> tuple[Any, str, dict[str, tuple[Any, Any]], Any]:
    """The source run, its configuration's name, each split's pixels and labels, and the model to
    fine-tune (`build_finetune_model` on the source's head); refuses an ensemble run."""
    from leukemia import tracking
    from leukemia.dataset import read_split

    tracking.setup()
    source = tracking.get_run(source_run_id)
    if source.data.tags.get(tracking.ENSEMBLE_MEMBERS_TAG):
        raise ValueError(
            f"run {source_run_id} is an ensemble: fine-tuning needs one configuration's head"
        )
    cfg = tracking.run_config(source)
    rows = read_split(split_path)
    size = cfg.model.input_size
    data = {s: read_pixels(rows, images_dir, size, s) for s in ("train", "val", "test")}
    log.info(
        "Fine-tuning run %s (%s), blocks %s: %d training and %d validation images of %d px",
        source_run_id,
        cfg.name,
        ",".join(ft.unfrozen),
        len(data["train"][0]),
        len(data["val"][0]),
        size,
    )
    model = build_finetune_model(cfg.model, tracking.load_head(source_run_id), ft)
    return source, cfg.name, data, model


def fine_tune_run(
    source_run_id: str,
    split_path: str | Path,
    images_dir: str | Path,
    ft: FineTuneConfig,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fine-tune a selected run's model and log it as its own MLflow run (kind `fine_tune`, linked
    by `source_run_id`), its full model logged as `tracking.log_full_model` logs any run's.

    Returns the new run id with its validation and test metrics and the source's validation macro-F1.
    """
    from leukemia import tracking
    from leukemia.evaluation import evaluate

    started = time.monotonic()
    source, title, data, model = _prepare(source_run_id, split_path, images_dir, ft)
    run_tags = {
        "fine_tune": "true",
        "source_run_id": source_run_id,
        "dataset_digest": source.data.tags.get("dataset_digest", ""),
        "config": source.data.tags.get("config", ""),
        "split_uri": str(split_path),
        **(tags or {}),
    }
    name = f"fine-tune-{source.info.run_name}"
    with (
        tracking.training_run(tracking.RunKind.FINE_TUNE, name, run_tags) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        tracking.log_values(params=_run_params(ft, source))
        history = fit_pixels(
            model,
            ft,
            *data["train"],
            *data["val"],
            on_epoch=tracking.log_epoch,
        )
        results = {
            s: evaluate(data[s][1], predict_pixels(model, data[s][0], ft.batch_size))
            for s in ("val", "test")
        }
        epochs_run = len(history.get("loss", []))
        seconds = time.monotonic() - started
        tracking.log_values({"epochs_run": epochs_run}, {"fine_tune_seconds": seconds})
        out = Path(tmp)
        tracking.log_results(results, out, history, title=f"fine-tune {title}")
        (out / "fine_tune.json").write_text(
            json.dumps({"source_run_id": source_run_id, **asdict(ft)}, indent=1)
        )
        tracking.log_folder(out)
        model_uri = tracking.log_model(run.info.run_id, model, images_dir, split_path)
    outcome = {
        "run_id": run.info.run_id,
        "source_run_id": source_run_id,
        "model_uri": model_uri,
        "val_f1_macro": results["val"]["metrics"]["f1_macro"],
        "test_f1_macro": results["test"]["metrics"]["f1_macro"],
        "source_val_f1_macro": source.data.metrics.get("val_f1_macro"),
        "epochs_run": epochs_run,
        "seconds": round(seconds, 1),
    }
    log.info(
        "Fine-tuned %s in %d epochs (%.0fs): val macro-F1 %.4f (source %s), run %s",
        title,
        epochs_run,
        seconds,
        outcome["val_f1_macro"],
        outcome["source_val_f1_macro"],
        run.info.run_id,
    )
    return outcome


def fine_tune_candidate(
    candidate: dict[str, Any],
    split_path: str | Path,
    images_dir: str | Path,
    ft: FineTuneConfig,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The candidate, or its fine-tuned run (`fine_tune_run`) when that scores a higher validation
    macro-F1 than the candidate's run (a tie keeps the candidate); an ensemble candidate is kept.

    A refit candidate has no validation split to compare on: the run it refits
    (`selected_run_id`, trained on the train split) is fine-tuned, and replaces the refit only when
    it beats that run on validation. Same shape as `candidate`, with `fine_tune` describing the run
    that was trained.
    """
    from leukemia import tracking

    tracking.setup()
    source_id = candidate.get("selected_run_id") or candidate["run_id"]
    source = tracking.get_run(source_id)
    if source.data.tags.get(tracking.ENSEMBLE_MEMBERS_TAG):
        log.info("The candidate %s is an ensemble: not fine-tuned", candidate["run_id"])
        return candidate
    outcome = fine_tune_run(source_id, split_path, images_dir, ft, tags)
    before = outcome["source_val_f1_macro"]
    chosen = before is None or outcome["val_f1_macro"] > before
    log.info(
        "Fine-tuned val macro-F1 %.4f vs the candidate's %s: %s",
        outcome["val_f1_macro"],
        "unknown" if before is None else f"{before:.4f}",
        "the fine-tuned model goes on" if chosen else "the candidate stays",
    )
    return {
        **candidate,
        "run_id": outcome["run_id"] if chosen else candidate["run_id"],
        "fine_tune": {**outcome, "chosen": chosen},
    }
