"""Throughput of the pipeline's networks on whatever runs Keras here: this CPU, or a GPU worker.

The pipeline's expensive steps are VGG16 passes. This bench runs the project's own builders on the
Keras backend that `KERAS_BACKEND` names (tensorflow here; jax on a GPU machine without TensorFlow,
which is how a GPU worker was measured) and prints images/s for:

- **extract**: `model.build_extractor` (preprocessing, overlay mask, VGG16 conv base, every pooled
  output): what `features.extract_features` runs per image;
- **block5 (activations)**: one training step of block 5 + the head on cached block-4 activations
  (`model.build_tail` → `model.build_head`), what `finetune.tune_activations` runs;
- **block5 (pixels, flip + rotation)**: one training step of the full model with block 5 trainable
  and the augmentation layers (`finetune.build_finetune_model`), what `finetune.tune_pixels` runs;
  `pixels-flip` and `pixels-noaug` drop the rotation layer, or both, to show what they cost;

in float32 and in mixed bfloat16, at several batch sizes. The weights are VGG16's shape with a fixed
random initialisation (`weights=none`: the arithmetic, not the values, sets the speed) and the
inputs random pixels or activations held in memory: JPEG decoding and the object store are not in
these figures. Every number is the best of `--rounds` timed passes over `--images` inputs after one
untimed pass that compiles (XLA on jax).

    KERAS_BACKEND=jax python bench/accelerator.py [--images 2048] [--train-images 1024]
        [--batches 32,128,512] [--train-batches 32,128] [--rounds 2]
        [--stages extract,activations,pixels,pixels-flip,pixels-noaug]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))
sys.path.insert(0, str(ROOT / "bench"))
from common import VGG16_GFLOP_224, machine, table  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def device() -> str:
    """The accelerator Keras computes on, or 'CPU'."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
        if backend == "torch":
            import torch

            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (torch)"
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return gpus[0].name if gpus else f"CPU (tensorflow {tf.__version__})"
    except Exception as exc:  # a bench reports what it can
        return f"unknown ({exc.__class__.__name__})"
    return backend


def best_rate(run: Callable[[], None], items: int, rounds: int) -> float:
    """items/s of the fastest of `rounds` timed calls of `run`, after one untimed call."""
    run()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return items / best


def extract_rate(precision: str, images: Any, batch: int, rounds: int) -> float:
    """images/s of the pipeline's extractor."""
    from leukemia.model import ModelConfig, build_extractor

    extractor = build_extractor(ModelConfig(weights="none", mask_overlay=True), precision)
    return best_rate(
        lambda: extractor.predict(images, batch_size=batch, verbose=0), len(images), rounds
    )


def _train_rate(model: Any, x: Any, y: Any, batch: int, rounds: int) -> float:
    """images/s of `model.fit` for one epoch (Adam, the fine-tuning loss)."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy")
    return best_rate(
        lambda: model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0),
        len(y),
        rounds,
    )


def activations_rate(precision: str, n: int, batch: int, rounds: int) -> float:
    """images/s of a training step of block 5 + the head on cached block-4 activations."""
    import keras
    import numpy as np

    from leukemia.model import (
        ModelConfig,
        build_head,
        build_tail,
        build_trunk,
        tail_inputs,
    )

    cfg = ModelConfig(weights="none", mask_overlay=True)
    tail = build_tail(cfg, build_trunk(cfg), precision)
    model = keras.Model(tail.input, build_head(cfg)(tail.output), name="block5_head")
    rng = np.random.default_rng(0)
    side = cfg.input_size // 16
    x = {"block4_pool": rng.random((n, side, side, 512), dtype="float32")}
    for key in tail_inputs(cfg.variant)[1:]:
        x[key] = rng.random((n, 256), dtype="float32")
    return _train_rate(model, x, rng.integers(0, 4, n), batch, rounds)


#: The from-pixels stages: which of `finetune.augmentation_layers` stay in the model.
PIXEL_STAGES = {
    "pixels": ("augment_flip", "augment_rotation"),
    "pixels-flip": ("augment_flip",),
    "pixels-noaug": (),
}


def pixels_rate(
    precision: str, images: Any, batch: int, rounds: int, augment: tuple[str, ...]
) -> float:
    """images/s of a training step of the full model with block 5 trainable (fine-tuning from
    pixels), with the named augmentation layers of `finetune.build_finetune_model` only."""
    import numpy as np

    from leukemia.finetune import FineTuneConfig, build_finetune_model
    from leukemia.model import ModelConfig, assemble, build_head, dtype_policy

    cfg = ModelConfig(weights="none", mask_overlay=True)
    ft = FineTuneConfig(blocks=1, source="pixels")

    with dtype_policy(precision):
        full = build_finetune_model(cfg, build_head(cfg), ft)
        layers = [full.get_layer(name) for name in augment]
        model = assemble(cfg, full.get_layer("vgg16_trunk"), full.get_layer("head"), augment=layers)
    labels = np.random.default_rng(0).integers(0, 4, len(images))
    return _train_rate(model, images, labels, batch, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2048, help="images per extraction pass")
    parser.add_argument("--train-images", type=int, default=1024, help="images per training epoch")
    parser.add_argument("--batches", default="32,128,512", help="extraction batch sizes")
    parser.add_argument("--train-batches", default="32,128", help="training batch sizes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--stages", default="extract,activations,pixels,pixels-flip,pixels-noaug")
    args = parser.parse_args()

    import keras
    import numpy as np

    stages = args.stages.split(",")
    precisions = args.precisions.split(",")
    print(
        f"{machine()}; {platform.python_version()}; keras {keras.__version__} on "
        f"{keras.backend.backend()}; device: {device()}",
        flush=True,
    )
    pixels = np.random.default_rng(0).integers(0, 256, (args.images, 224, 224, 3)).astype("float32")
    rows: list[dict[str, Any]] = []

    def record(stage: str, precision: str, batch: int, n: int, rate: float) -> None:
        rows.append(
            {
                "stage": stage,
                "precision": precision,
                "batch": batch,
                "images": n,
                "images/s": rate,
                "VGG16-pass TFLOP/s": rate * VGG16_GFLOP_224 / 1e3,
            }
        )
        print(f"  {stage} {precision} batch {batch}: {rate:,.0f} images/s", flush=True)

    for precision in precisions:
        if "extract" in stages:
            for batch in map(int, args.batches.split(",")):
                record(
                    "extract",
                    precision,
                    batch,
                    len(pixels),
                    extract_rate(precision, pixels, batch, args.rounds),
                )
        for batch in map(int, args.train_batches.split(",")):
            n = args.train_images - args.train_images % batch
            if "activations" in stages:
                record(
                    "block5 (activations)",
                    precision,
                    batch,
                    n,
                    activations_rate(precision, n, batch, args.rounds),
                )
            for stage, layers in PIXEL_STAGES.items():
                if stage in stages:
                    what = (
                        " + ".join(n.removeprefix("augment_") for n in layers) or "no augmentation"
                    )
                    record(
                        f"block5 (pixels, {what})",
                        precision,
                        batch,
                        n,
                        pixels_rate(precision, pixels[:n], batch, args.rounds, layers),
                    )
    print()
    print(table(rows))
    print(
        f"\nVGG16-pass TFLOP/s: images/s × {VGG16_GFLOP_224} GFLOP (one forward pass of the conv "
        "base at 224 px; a training step does more, so it is a yardstick, not a utilisation)."
    )
    print(f"KERAS_BACKEND={os.environ.get('KERAS_BACKEND', 'tensorflow')}")


if __name__ == "__main__":
    main()
