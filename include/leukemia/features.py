"""Cached base features: one frozen-VGG16 pass per image, reused by every grid configuration.

The cache key is (weights identity, input size, precision); each image's entry is a file named by its
sha256 holding every pooled output of `model.POOLED_KEYS`, so every feature variant comes out of the
same single pass and a later run computes only images that are not cached yet.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES, PRECISIONS
from leukemia.model import POOL_WIDTHS, POOLED_KEYS, VARIANTS, ModelConfig
from leukemia.weights import weights_identity

log = logging.getLogger(__name__)

PROGRESS_EVERY = 256


def _offsets() -> dict[str, tuple[int, int]]:
    """Column range of each pooled output inside a cache row."""
    out, start = {}, 0
    for key in POOLED_KEYS:
        width = POOL_WIDTHS[key.rsplit("_", 1)[0]]
        out[key] = (start, start + width)
        start += width
    return out


_OFFSETS = _offsets()
CACHE_WIDTH = max(end for _, end in _OFFSETS.values())  # 2,560 floats per image


def bf16_supported() -> bool:
    """True where bfloat16 matmuls are fast: a GPU, or a CPU with AVX-512 BF16 / AMX."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_precision(precision: str) -> str:
    """'auto' → 'bfloat16' where supported, else 'float32'."""
    if precision == "auto":
        return "bfloat16" if bf16_supported() else "float32"
    if precision not in PRECISIONS:
        choices = f"{', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}"
        raise ValueError(f"precision must be {choices}, got {precision!r}")
    return precision


def cache_dir_for(root: str | Path, cfg: ModelConfig, precision: str) -> Path:
    """The cache folder for one (weights, input size, precision)."""
    return Path(root) / f"{weights_identity(cfg.weights)}-{cfg.input_size}px-{precision}"


def load_images(paths: Sequence[str | Path], size: int) -> Any:
    """A batch of images as one float32 array (n, size, size, 3), each read by `images.load_image`."""
    import numpy as np

    from leukemia.images import load_image

    return np.stack([load_image(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3))


def build_extractor(cfg: ModelConfig, precision: str = "float32") -> Any:
    """preprocess → trunk → every pooled output, concatenated in `POOLED_KEYS` order (float32 out)."""
    import keras

    from leukemia.model import build_pool, build_preprocess, build_trunk

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        trunk = build_trunk(cfg)
        pre = build_preprocess(cfg.input_size)
    finally:
        keras.config.set_dtype_policy(previous)
    inputs = keras.Input((cfg.input_size, cfg.input_size, 3), name="pixels")
    pooled = trunk(pre(inputs), training=False)
    pooled = [keras.ops.cast(t, "float32") for t in pooled]
    out = build_pool(cfg.input_size, "multiscale")(pooled)
    return keras.Model(inputs, out, name=f"extractor_{precision}")


@dataclass
class ExtractResult:
    """Where the features are and how much work it took (small: fits in XCom)."""

    cache_dir: str
    images: int
    computed: int
    cached: int
    seconds: float
    images_per_s: float
    precision: str


def extract_features(
    paths: Sequence[str | Path],
    shas: Sequence[str],
    cfg: ModelConfig,
    cache_root: str | Path,
    precision: str = "auto",
    batch_size: int = 32,
) -> ExtractResult:
    """Compute and cache pooled features of every image whose sha256 is not cached yet."""
    import numpy as np

    precision = resolve_precision(precision)
    cache = cache_dir_for(cache_root, cfg, precision)
    cache.mkdir(parents=True, exist_ok=True)
    todo: dict[str, str | Path] = {}
    for path, sha in zip(paths, shas, strict=True):
        if sha not in todo and not (cache / f"{sha}.npy").exists():
            todo[sha] = path
    n_unique = len(set(shas))
    log.info(
        "Features for %d images in %s: %d cached, %d to compute (%s)",
        n_unique,
        cache,
        n_unique - len(todo),
        len(todo),
        precision,
    )
    started = time.monotonic()
    if todo:
        extractor = build_extractor(cfg, precision)
        started = time.monotonic()  # the rate is the extraction's, not the model build's
        items = list(todo.items())
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = load_images([p for _, p in chunk], cfg.input_size)
            feats = np.asarray(extractor.predict_on_batch(batch), dtype="float32")
            for (sha, _), row in zip(chunk, feats, strict=True):
                tmp = cache / f".{sha}.{uuid.uuid4().hex}.npy"
                np.save(tmp, row)
                os.replace(tmp, cache / f"{sha}.npy")
            done = start + len(chunk)
            if done % PROGRESS_EVERY < batch_size or done == len(items):
                rate = done / max(time.monotonic() - started, 1e-9)
                log.info("Extracted %d/%d images (%.1f images/s)", done, len(items), rate)
    seconds = time.monotonic() - started
    return ExtractResult(
        cache_dir=str(cache),
        images=n_unique,
        computed=len(todo),
        cached=n_unique - len(todo),
        seconds=round(seconds, 3),
        images_per_s=round(len(todo) / seconds, 2) if todo and seconds > 0 else 0.0,
        precision=precision,
    )


def select_variant(cached: Any, variant: str) -> Any:
    """The variant's columns of cached rows (n, CACHE_WIDTH) → (n, feature_width(variant))."""
    import numpy as np

    return np.concatenate([cached[:, slice(*_OFFSETS[k])] for k in VARIANTS[variant]], axis=1)


def load_features(cache_dir: str | Path, shas: Sequence[str], variant: str) -> Any:
    """Feature matrix of the given images for one variant, from the cache."""
    import numpy as np

    cache = Path(cache_dir)
    missing = [s for s in shas if not (cache / f"{s}.npy").exists()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images have no cached features in {cache} (first: {missing[0]}); "
            "run extract_features for this split first"
        )
    rows = (
        np.stack([np.load(cache / f"{s}.npy") for s in shas])
        if shas
        else np.zeros((0, CACHE_WIDTH))
    )
    return select_variant(rows.astype("float32"), variant)


def labels_to_index(labels: Sequence[str]) -> Any:
    """Class names → integer indices in `CLASSES` order."""
    import numpy as np

    index = {c: i for i, c in enumerate(CLASSES)}
    return np.asarray([index[label] for label in labels], dtype="int64")
