"""Fine-tuning the selected model: its last VGG16 block(s) trained with the head, a low learning rate.

Everywhere else the trunk is frozen and only heads are trained, on cached features. Fine-tuning
starts from a selected run (its configuration and trained head) and trains the last `blocks` conv
blocks of VGG16 (1: block5) and the head together with Adam at a low learning rate, early stopping
on the validation loss (best epoch kept). Two sources (`FineTuneConfig.source`, the Param
`fine_tune_source`):

- **activations** (block 5 only; `auto` picks it for 1 block): blocks 1-4 are frozen, so an image's
  `block4_pool` output never changes. The extraction caches it once (`features.activations_dir`,
  float16, the augmented copies' too), and block 5 and the head train on it
  (`model.build_tail`): an epoch costs block 5's forward and backward pass, about a fifth
  of a pass over the pixels; on a CPU with bfloat16 (`FineTuneConfig.precision`) in mixed
  precision. Each epoch shows each training image once, as the original or as one of its cached
  augmented copies (`augment.py`), drawn at random: the copies are its augmentation.
- **pixels** (any number of blocks): the full model (`model.assemble(augment=...)`) on the training
  split's images read from the images store, with flips and small rotations (stock Keras layers
  after the overlay mask, identity at inference). Every epoch runs all of VGG16 forward: a GPU's
  job (the `training` queue).

Either way the result is the usual pixels-to-softmax model (`model.assemble`: preprocessing and
mask inside, loads in Keras' safe mode, Grad-CAM works), its head calibrated again on the
validation split (`runs.calibrate`: the fine-tuned logits are not the source's), logged as a run
of its own. `fine_tune_candidate` decides whether it replaces the selected candidate; the audit and
the gate then treat it like any candidate.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from leukemia.config import FINE_TUNE_SOURCES, PRECISIONS, RUN_DEFAULTS, RunDefaults
from leukemia.model import ModelConfig
from leukemia.training import TrainConfig

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
    rotation: float = 0.1  # RandomRotation factor (pixels): up to ±0.1 of a full turn (36°)
    seed: int = RUN_DEFAULTS.seed
    source: str = RUN_DEFAULTS.fine_tune_source  # "activations", "pixels" or "auto"
    precision: str = "auto"  # block 5's compute on activations: auto = bfloat16 where fast

    def __post_init__(self) -> None:
        if not 1 <= self.blocks <= len(VGG_BLOCKS):
            raise ValueError(f"blocks must be 1-{len(VGG_BLOCKS)} (1 = block5), got {self.blocks}")
        if self.source not in FINE_TUNE_SOURCES:
            raise ValueError(
                f"fine-tuning source must be one of {', '.join(FINE_TUNE_SOURCES)}, got "
                f"{self.source!r}"
            )
        if self.source == "activations" and self.blocks != 1:
            raise ValueError(
                f"fine-tuning from block-4 activations trains block5 only, not {self.blocks} "
                "blocks: use the source pixels (or auto) for deeper unfreezing"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.learning_rate <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                "learning_rate must be > 0 and epochs, batch_size >= 1, got "
                f"{self.learning_rate}, {self.epochs}, {self.batch_size}"
            )

    @classmethod
    def of(cls, settings: RunDefaults) -> FineTuneConfig:
        """The fine-tuning a run's settings ask for (`fine_tune_*`, `patience`, `seed`)."""
        return cls(
            blocks=settings.fine_tune_blocks,
            learning_rate=settings.fine_tune_learning_rate,
            epochs=settings.fine_tune_epochs,
            patience=settings.patience,
            seed=settings.seed,
            source=settings.fine_tune_source,
        )

    @property
    def unfrozen(self) -> tuple[str, ...]:
        """The VGG16 blocks that train, e.g. ('block5',)."""
        return VGG_BLOCKS[-self.blocks :]

    @property
    def from_activations(self) -> bool:
        """True when block 5 trains on cached block-4 activations (`auto`: when blocks is 1); the
        extraction must then cache them (`features.extract_features(activations=True)`)."""
        return self.source == "activations" or (self.source == "auto" and self.blocks == 1)

    @property
    def source_used(self) -> str:
        """`activations` or `pixels`: the source `auto` resolves to."""
        return "activations" if self.from_activations else "pixels"


@dataclass
class Tuned:
    """What fine-tuning produced, from either source: the trunk (its unfrozen blocks trained), the
    head, the epochs' history and wall times, the val and test splits as the tuned network's
    features (the head's input) with their labels (`runs.calibrate`'s `data`), and the validation
    cross-entropy before training (uncalibrated, as the epochs measure it)."""

    trunk: Any
    head: Any
    history: dict[str, list[float]]
    epoch_seconds: list[float]
    data: dict[str, tuple[Any, Any]]
    val_start: float = float("nan")

    @property
    def val_best(self) -> float:
        """The validation cross-entropy of the kept epoch (the lowest)."""
        return min(self.history.get("val_cross_entropy") or [float("nan")])


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


def _fit(
    model: Any,
    ft: FineTuneConfig,
    train: Any,
    val: Any,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, list[float]], list[float], float]:
    """Train `model` on the `train` dataset: Adam at `ft.learning_rate`, early stopping on the
    `val` dataset's cross-entropy (`val_cross_entropy`: without the linear head's L2 penalty,
    which `val_loss` adds, as `training.fit_head` stops) with the best epoch's weights kept; each
    epoch is logged (with its wall time, `epoch_seconds`). Returns the history, each epoch's
    seconds, and the validation cross-entropy before training (the source's, measured the same
    way as the epochs')."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(ft.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", keras.metrics.SparseCategoricalCrossentropy(name="cross_entropy")],
    )
    start = float(model.evaluate(val, verbose=0, return_dict=True)["cross_entropy"])
    started = [time.monotonic()]
    seconds: list[float] = []

    def epoch_end(epoch: int, logs: dict[str, Any]) -> None:
        seconds.append(time.monotonic() - started[0])
        started[0] = time.monotonic()
        values = {k: float(v) for k, v in (logs or {}).items()}
        log.info(
            "Fine-tuning epoch %d/%d: loss %.4f acc %.4f val_cross_entropy %.4f val_acc %.4f "
            "(%.0fs)",
            epoch + 1,
            ft.epochs,
            values.get("loss", float("nan")),
            values.get("accuracy", float("nan")),
            values.get("val_cross_entropy", float("nan")),
            values.get("val_accuracy", float("nan")),
            seconds[-1],
        )
        if on_epoch is not None:
            on_epoch(epoch, {**values, "epoch_seconds": seconds[-1]})

    history = model.fit(
        train,
        validation_data=val,
        epochs=ft.epochs,
        shuffle=False,  # the datasets shuffle, seeded, every epoch
        verbose=0,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_cross_entropy", patience=ft.patience, restore_best_weights=True
            ),
            keras.callbacks.LambdaCallback(on_epoch_end=epoch_end),
        ],
    )
    return {k: [float(v) for v in values] for k, values in history.history.items()}, seconds, start


def fit_pixels(
    model: Any,
    ft: FineTuneConfig,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Train `model` (from `build_finetune_model`) on pixels (`_fit`); returns the history."""
    import keras

    keras.utils.set_random_seed(ft.seed)
    train = _dataset(x_train, y_train, ft.batch_size, shuffle_seed=ft.seed)
    history, _, _ = _fit(model, ft, train, _dataset(x_val, y_val, ft.batch_size), on_epoch)
    return history


def predict_pixels(model: Any, x: Any, batch_size: int = 32) -> Any:
    """Class probabilities of uint8 pixels, in inference mode (augmentation off)."""
    import numpy as np

    if not len(x):
        return np.zeros((0, 4), dtype="float32")
    return np.asarray(model.predict(_dataset(x, np.zeros(len(x)), batch_size), verbose=0))


def tune_pixels(
    cfg: ModelConfig,
    head: Any,
    data: dict[str, tuple[Any, Any]],
    ft: FineTuneConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> Tuned:
    """Fine-tune `ft.unfrozen` blocks and the head from pixels (`data`: split → (uint8 pixels,
    labels), `read_pixels`); the val and test features come from the tuned trunk."""
    import keras

    from leukemia.model import build_pool, build_preprocess

    keras.utils.set_random_seed(ft.seed)
    model = build_finetune_model(cfg, head, ft)
    train = _dataset(*data["train"], ft.batch_size, shuffle_seed=ft.seed)
    val = _dataset(*data["val"], ft.batch_size)
    history, seconds, start = _fit(model, ft, train, val, on_epoch)
    trunk = model.get_layer("vgg16_trunk")
    inputs = keras.Input((cfg.input_size, cfg.input_size, 3), name="pixels")
    pooled = trunk(build_preprocess(cfg.input_size, cfg.mask_overlay)(inputs), training=False)
    features = keras.Model(inputs, build_pool(cfg.input_size, cfg.variant)(pooled))
    out = {
        s: (predict_pixels(features, data[s][0], ft.batch_size), data[s][1])
        for s in ("val", "test")
    }
    return Tuned(trunk, model.get_layer("head"), history, seconds, out, start)


def activation_batches(
    versions: Sequence[dict[str, Any]], y: Any, batch_size: int, seed: int | None = None
) -> Callable[[], Iterator[tuple[dict[str, Any], Any]]]:
    """A generator function of one epoch's batches (float32 inputs, labels) of cached
    activations (`features.load_activations`). `versions[0]` holds the images, the others their
    augmented copies (same rows). With `seed`, every epoch shuffles the images and shows each once
    as one of its versions, drawn at random; without, the originals in order."""
    import numpy as np

    rng = np.random.default_rng(seed)  # one stream over the epochs: each draws anew

    def epoch() -> Iterator[tuple[dict[str, Any], Any]]:
        n = len(y)
        order = rng.permutation(n) if seed is not None else np.arange(n)
        version = rng.integers(len(versions), size=n) if seed is not None else np.zeros(n, int)
        for first in range(0, n, batch_size):
            rows, which = order[first : first + batch_size], version[first : first + batch_size]
            batch = {}
            for key, array in versions[0].items():
                out = np.empty((len(rows), *array.shape[1:]), dtype="float32")
                for v, arrays in enumerate(versions):
                    out[which == v] = arrays[key][rows[which == v]]
                batch[key] = out
            yield batch, y[rows]

    return epoch


def _activation_dataset(
    versions: Sequence[dict[str, Any]], y: Any, batch_size: int, seed: int | None = None
) -> Any:
    """`activation_batches` as a tf.data pipeline, the next batch prepared while one trains."""
    import tensorflow as tf

    spec = {k: tf.TensorSpec((None, *a.shape[1:]), tf.float32) for k, a in versions[0].items()}
    data = tf.data.Dataset.from_generator(
        activation_batches(versions, y, batch_size, seed),
        output_signature=(spec, tf.TensorSpec((None,), tf.int64)),
    )
    batches = -(-len(y) // batch_size)
    return data.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(2)


def load_activation_splits(
    cfg: TrainConfig, rows: list[dict[str, str]], cache_dir: str | Path
) -> dict[str, tuple[list[dict[str, Any]], Any]]:
    """Each split's cached activations (`model.tail_inputs` of the variant) and labels: split
    → ([originals, copy 1, ...], labels), the copies (`cfg.augment_copies`) for train only."""
    from leukemia.features import augmented_dir, labels_to_index, load_activations
    from leukemia.model import tail_inputs

    keys = tail_inputs(cfg.model.variant)
    out = {}
    for split in ("train", "val", "test"):
        part = [r for r in rows if r["split"] == split]
        if not part:
            raise ValueError(f"the split has no {split} images: fine-tuning needs all three")
        shas = [r["sha256"] for r in part]
        folders = [str(cache_dir)]
        if split == "train":
            folders += [augmented_dir(cache_dir, c) for c in range(cfg.augment_copies)]
        versions = [load_activations(f, shas, keys) for f in folders]
        out[split] = (versions, labels_to_index([r["label"] for r in part]))
    return out


def tune_activations(
    cfg: TrainConfig,
    head: Any,
    data: dict[str, tuple[list[dict[str, Any]], Any]],
    ft: FineTuneConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    blocks: int = 1,
) -> Tuned:
    """Fine-tune block 5 and the head on cached block-4 activations (`data`:
    `load_activation_splits`), in `ft.precision`; the trained block 5 goes into a fresh trunk
    (blocks 1-4 as loaded), and the val and test features are computed from the activations in
    float32 by the tuned network (`model.build_tail`). `blocks` 2 trains blocks 4-5 from cached
    `block3_pool` activations instead (`bench/finetune_blocks45.py`; the pipeline caches block 4's
    only)."""
    import keras
    import numpy as np

    from leukemia.features import resolve_precision
    from leukemia.model import build_tail, build_trunk, tail_layers

    trunk = build_trunk(cfg.model)
    keras.utils.set_random_seed(ft.seed)
    tail = build_tail(cfg.model, trunk, resolve_precision(ft.precision), blocks)
    model = keras.Model(tail.input, head(tail.output, training=False), name="tail_head")
    train = _activation_dataset(*data["train"], ft.batch_size, seed=ft.seed)
    val = _activation_dataset(*data["val"], ft.batch_size)
    history, seconds, start = _fit(model, ft, train, val, on_epoch)
    for name in tail_layers(blocks):
        trunk.get_layer(name).set_weights(tail.get_layer(name).get_weights())
    tuned = build_tail(cfg.model, trunk, "float32", blocks)
    out = {}
    for split in ("val", "test"):
        (arrays,), y = data[split]
        batches = _activation_dataset([arrays], y, ft.batch_size)
        out[split] = (np.asarray(tuned.predict(batches, verbose=0)), y)
    return Tuned(trunk, head, history, seconds, out, start)


def ensure_activations(
    cache_dir: str | Path, rows: list[dict[str, str]], images_dir: str | Path, cfg: TrainConfig
) -> None:
    """Make sure the split's block-4 activations (and the training images' `cfg.augment_copies`
    copies) are cached in `cache_dir`: nothing to do when the extraction cached them; else they
    are computed here, a second pass over those images' pixels, with a warning."""
    from leukemia.dataset import training_shas
    from leukemia.features import cache_key, extract_features
    from leukemia.objectstore import join

    key = cache_key(cache_dir, cfg.model)
    done = extract_features(
        [join(images_dir, r["path"]) for r in rows],
        [r["sha256"] for r in rows],
        replace(cfg.model, backend=key.backend),  # the folder's trunk, its calibration the same
        key.root,
        precision=key.precision,
        augment=training_shas(rows),
        copies=cfg.augment_copies,
        activations=True,
    )
    if done.computed or done.augmented:
        log.warning(
            "%d images and %d augmented copies had no cached block-4 activations in %s: computed "
            "now, a second pass over their pixels. Extract with activations when fine-tuning from "
            "activations is on",
            done.computed,
            done.augmented,
            cache_dir,
        )


def _run_params(ft: FineTuneConfig, source: Any) -> dict[str, Any]:
    """The fine-tuning run's params: the fine-tuning settings beside the source run's own."""
    return {
        **{f"fine_tune_{k}": v for k, v in asdict(ft).items()},
        "fine_tune_unfrozen": ",".join(ft.unfrozen),
        "fine_tune_source_used": ft.source_used,
        "source_run_id": source.info.run_id,
        **{k: v for k, v in source.data.params.items() if k != "epochs_run"},
    }


def _prepare(source_run_id: str, ft: FineTuneConfig) -> tuple[Any, TrainConfig, Any]:
    """The source run, its configuration and its head, uncalibrated (temperature 1: fine-tuning
    changes the logits, so `fine_tune_run` calibrates again); refuses an ensemble run."""
    from leukemia import tracking
    from leukemia.calibration import calibrated_head

    tracking.setup()
    source = tracking.get_run(source_run_id)
    if source.data.tags.get(tracking.ENSEMBLE_MEMBERS_TAG):
        raise ValueError(
            f"run {source_run_id} is an ensemble: fine-tuning needs one configuration's head"
        )
    cfg = tracking.run_config(source)
    head = tracking.load_head(source_run_id)
    if "temperature" in {layer.name for layer in head.layers}:
        head = calibrated_head(head, 1.0)
    log.info(
        "Fine-tuning run %s (%s), blocks %s from %s",
        source_run_id,
        cfg.name,
        ",".join(ft.unfrozen),
        ft.source_used,
    )
    return source, cfg, head


def _tune(
    source: Any,
    cfg: TrainConfig,
    head: Any,
    split_path: str | Path,
    images_dir: str | Path,
    ft: FineTuneConfig,
    cache_dir: str | Path | None,
) -> Tuned:
    """Read the split's training data from the source `ft` names and fine-tune (`tune_*`); each
    epoch is logged to the active run."""
    from leukemia import tracking
    from leukemia.dataset import read_split
    from leukemia.watch import FEATURES_TAG

    rows = read_split(split_path)
    if not ft.from_activations:
        size = cfg.model.input_size
        pixels = {s: read_pixels(rows, images_dir, size, s) for s in ("train", "val", "test")}
        return tune_pixels(cfg.model, head, pixels, ft, tracking.log_epoch)
    cache_dir = cache_dir or source.data.tags.get(FEATURES_TAG)
    if not cache_dir:
        raise ValueError(
            f"run {source.info.run_id} does not name its feature cache (tag {FEATURES_TAG}): "
            "pass cache_dir, or fine-tune from pixels"
        )
    ensure_activations(cache_dir, rows, images_dir, cfg)
    data = load_activation_splits(cfg, rows, cache_dir)
    return tune_activations(cfg, head, data, ft, tracking.log_epoch)


def fine_tune_run(
    source_run_id: str,
    split_path: str | Path,
    images_dir: str | Path,
    ft: FineTuneConfig,
    tags: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune a selected run's model and log it as its own MLflow run (kind `fine_tune`, linked
    by `source_run_id`), its full model logged as `tracking.log_full_model` logs any run's.

    From activations, they are read from `cache_dir` (default: the feature cache the source run
    trained on, its `features_uri` tag). Returns the new run id with its validation and test
    metrics, the source's validation macro-F1, and the epochs' wall times.
    """
    from leukemia import tracking
    from leukemia.model import assemble
    from leukemia.runs import calibrate

    started = time.monotonic()
    source, cfg, head = _prepare(source_run_id, ft)
    run_tags = {
        "fine_tune": "true",
        "fine_tune_source": ft.source_used,
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
        tuned = _tune(source, cfg, head, split_path, images_dir, ft, cache_dir)
        head, results = calibrate(cfg, tuned.head, tuned.data, None)
        epochs_run = len(tuned.history.get("loss", []))
        seconds = time.monotonic() - started
        tracking.log_values({"epochs_run": epochs_run}, {"fine_tune_seconds": seconds})
        out = Path(tmp)
        tracking.log_results(results, out, tuned.history, title=f"fine-tune {cfg.name}")
        (out / "fine_tune.json").write_text(
            json.dumps({"source_run_id": source_run_id, **asdict(ft)}, indent=1)
        )
        tracking.log_folder(out)
        full = assemble(cfg.model, tuned.trunk, head)
        model_uri = tracking.log_model(run.info.run_id, full, images_dir, split_path)
    outcome = {
        "run_id": run.info.run_id,
        "source_run_id": source_run_id,
        "source": ft.source_used,
        "model_uri": model_uri,
        "val_f1_macro": results["val"]["metrics"]["f1_macro"],
        "test_f1_macro": results["test"]["metrics"]["f1_macro"],
        "source_val_f1_macro": source.data.metrics.get("val_f1_macro"),
        "val_cross_entropy": tuned.val_best,
        "source_val_cross_entropy": tuned.val_start,
        "epochs_run": epochs_run,
        "epoch_seconds": [round(s, 1) for s in tuned.epoch_seconds],
        "seconds": round(seconds, 1),
    }
    log.info(
        "Fine-tuned %s from %s in %d epochs (%.0fs): val macro-F1 %.4f (source %s), run %s",
        cfg.name,
        ft.source_used,
        epochs_run,
        seconds,
        outcome["val_f1_macro"],
        outcome["source_val_f1_macro"],
        run.info.run_id,
    )
    return outcome


def fine_tune_wins(outcome: dict[str, Any]) -> bool:
    """Whether a fine-tuned run (`fine_tune_run`'s outcome) beats its source on validation: a
    higher macro-F1, a tie going to the lower cross-entropy, as selection ranks runs
    (`selection.best_run`). Both cross-entropies are uncalibrated and measured by the fine-tuning
    network, before and after training; a source without a validation macro-F1 loses."""
    before = outcome["source_val_f1_macro"]
    if before is None:
        return True
    after = (outcome["val_f1_macro"], -outcome["val_cross_entropy"])
    return after > (before, -outcome["source_val_cross_entropy"])


def fine_tune_candidate(
    candidate: dict[str, Any],
    split_path: str | Path,
    images_dir: str | Path,
    ft: FineTuneConfig,
    tags: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The candidate, or its fine-tuned run (`fine_tune_run`) when that beats the candidate's run
    on validation (`fine_tune_wins`); an ensemble candidate is kept.

    A refit candidate has no validation split to compare on: the run it refits
    (`selected_run_id`, trained on the train split) is fine-tuned, and replaces the refit only when
    it beats that run on validation. Same shape as `candidate`, with `fine_tune` describing the run
    that was trained. `cache_dir`: see `fine_tune_run`.
    """
    from leukemia import tracking

    tracking.setup()
    source_id = candidate.get("selected_run_id") or candidate["run_id"]
    source = tracking.get_run(source_id)
    if source.data.tags.get(tracking.ENSEMBLE_MEMBERS_TAG):
        log.info("The candidate %s is an ensemble: not fine-tuned", candidate["run_id"])
        return candidate
    outcome = fine_tune_run(source_id, split_path, images_dir, ft, tags, cache_dir)
    chosen = fine_tune_wins(outcome)
    log.info(
        "Fine-tuned val macro-F1 %.4f, cross-entropy %.4f vs the source's %s, %.4f: %s",
        outcome["val_f1_macro"],
        outcome["val_cross_entropy"],
        outcome["source_val_f1_macro"],
        outcome["source_val_cross_entropy"],
        "the fine-tuned model goes on" if chosen else "the candidate stays",
    )
    return {
        **candidate,
        "run_id": outcome["run_id"] if chosen else candidate["run_id"],
        "fine_tune": {**outcome, "chosen": chosen},
    }
