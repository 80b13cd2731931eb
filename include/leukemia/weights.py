"""Where the VGG16 base weights come from: `imagenet`, a local file, or `none`, resolved before work.

`resolve_weights` is called before anything expensive starts (the DAG's feature extraction, the demo,
the benchmarks): a local file must exist; ImageNet weights are taken from Keras' own cache
(`$KERAS_HOME/models`, default `~/.keras/models`) or downloaded into it once. When they cannot be had
it raises `WeightsUnavailable` with one line saying what failed, why, and what to set instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from functools import lru_cache
from pathlib import Path

from leukemia.errors import first_line

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
NONE = "none"
#: Keras' own name, address and md5 of the VGG16 include_top=False ImageNet file (keras/applications/vgg16.py).
IMAGENET_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + IMAGENET_NOTOP_FILE
)
IMAGENET_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"
#: Seconds without an answer before a download attempt is given up (an air-gapped site may drop packets).
DOWNLOAD_TIMEOUT_S = 30.0
FIX = (
    "set LEUKEMIA_WEIGHTS (or the DAG's `weights` Param) to a local VGG16 include_top=False .h5 "
    "file, or to none (random initialisation: for trying the pipeline only)"
)


class WeightsUnavailable(ValueError):
    """The configured VGG16 weights cannot be had or loaded; the message is one line with the fix.

    A setting, not a passing fault: the DAG fails such a task at once instead of retrying it.
    """


def normalize(weights: str | None) -> str:
    """`imagenet`, `none` (also for an empty value) or the weights file path as given."""
    text = (weights or "").strip()
    if text.lower() in ("", NONE):
        return NONE
    if text.lower() == IMAGENET:
        return IMAGENET
    return text


def keras_cache_dir() -> Path:
    """The folder where Keras keeps downloaded weights: `$KERAS_HOME/models`, else `~/.keras/models`."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home).expanduser() / "models"


def cached_imagenet_file() -> Path | None:
    """The ImageNet no-top file in Keras' cache, or None when it is not there."""
    path = keras_cache_dir() / IMAGENET_NOTOP_FILE
    return path if path.is_file() and path.stat().st_size > 0 else None


def download_imagenet(timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download the ImageNet no-top file into Keras' cache (Keras checks its md5)."""
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        path = keras.utils.get_file(
            IMAGENET_NOTOP_FILE,
            IMAGENET_NOTOP_URL,
            cache_subdir="models",
            cache_dir=str(keras_cache_dir().parent),
            file_hash=IMAGENET_NOTOP_MD5,
        )
    finally:
        socket.setdefaulttimeout(previous)
    return Path(path)


def resolve_weights(weights: str | None, download: bool = True) -> str:
    """Make sure the weights can be loaded without further network access; return their canonical form.

    Returns `none`, `imagenet` (the file is now in Keras' cache) or the absolute path of a weights
    file. Raises `WeightsUnavailable` with a one-line message otherwise.
    """
    value = normalize(weights)
    if value == NONE:
        return NONE
    if value != IMAGENET:
        path = Path(value).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"VGG16 weights file {path} does not exist: {FIX}")
        return str(path.resolve())
    cached = cached_imagenet_file()
    if cached is not None:
        return IMAGENET
    target = keras_cache_dir() / IMAGENET_NOTOP_FILE
    if not download:
        raise WeightsUnavailable(
            f"VGG16 ImageNet weights are not in the Keras cache ({target}) and downloads are off: {FIX}"
        )
    log.info("Downloading the VGG16 ImageNet weights (58 MB) into %s", target.parent)
    try:
        download_imagenet()
    except Exception as exc:  # every failure of the download means the same thing to the user
        raise WeightsUnavailable(
            f"VGG16 ImageNet weights could not be downloaded ({first_line(exc)}) and are not in "
            f"the Keras cache ({target}): {FIX}"
        ) from None
    return IMAGENET


def weights_identity(weights: str) -> str:
    """A short, stable name for the base weights (part of the feature-cache key and MLflow params)."""
    value = normalize(weights)
    if value in (IMAGENET, NONE):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"VGG16 weights file {path} does not exist: {FIX}")
    return f"{path.stem}-{_file_digest(str(path.resolve()), path.stat().st_mtime_ns)[:12]}"


@lru_cache(maxsize=8)
def _file_digest(path: str, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
