"""Reading images, in one place: which names are images, the images of a folder, checks, decoding.

The sync, feature extraction, prediction and the plots all read images through here, so an image is
checked, converted to RGB and resized the same way everywhere (cached features and the saved model
depend on it). numpy and Pillow are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from leukemia.config import CLASSES

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MIN_IMAGE_SIDE = 32
_CLASS_BY_FOLDER = {c.lower(): c for c in CLASSES}


class ImageRejected(ValueError):
    """The bytes are not a usable image; the message is the reason."""


# --- names and folders ----------------------------------------------------------------------------


def class_of_folder(name: str) -> str | None:
    """The class a folder name stands for (matched case-insensitively), or None."""
    return _CLASS_BY_FOLDER.get(name.lower())


def is_image_name(name: str) -> bool:
    """True for names ending in a known image suffix (case-insensitive)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def iter_image_files(source: Path) -> Iterator[tuple[str, Path]]:
    """(class, path) for every image in a `<Class>/<name>` folder, classes matched case-insensitively."""
    for folder in sorted(p for p in Path(source).iterdir() if p.is_dir()):
        label = class_of_folder(folder.name)
        if label is None:
            log.warning("Ignoring folder %s: not one of %s", folder, ", ".join(CLASSES))
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and is_image_name(path.name):
                yield label, path


def iter_folder(folder: Path) -> Iterator[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders are left out."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if any(p.startswith(".") for p in rel):
            continue
        if path.is_file() and is_image_name(path.name):
            yield path


# --- checking and decoding ------------------------------------------------------------------------


def validate_image(data: bytes) -> tuple[int, int]:
    """Decode `data` fully; return (width, height) or raise ImageRejected with the reason."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageRejected("empty object (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
    except UnidentifiedImageError:
        raise ImageRejected("not an image: Pillow cannot identify it") from None
    except Image.DecompressionBombError as exc:  # not an OSError: would abort the whole sync
        raise ImageRejected(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"corrupt or truncated image: {exc}") from None
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageRejected(f"image too small: {width}x{height}, need at least {MIN_IMAGE_SIDE} px")
    return width, height


def load_image(source: str | Path | BinaryIO, size: int) -> np.ndarray:
    """An RGB image as float32 pixels 0-255 of shape (size, size, 3), resized bilinearly if needed.

    The one conversion every model input goes through: training features, prediction, Grad-CAM.
    """
    import numpy as np
    from PIL import Image

    with Image.open(source) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype="float32")


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Validated RGB float32 pixels (size, size, 3) of image bytes, resized as `load_image` does."""
    validate_image(data)  # raises ImageRejected with the reason
    return load_image(io.BytesIO(data), size)


def fit_in_box(image: np.ndarray | str | Path, box: int) -> np.ndarray:
    """An RGB uint8 array scaled to fit a `box` pixel square, from a path or an array (0-255 or 0-1).

    For pictures shown to people (plots, contact sheets), not for model inputs.
    """
    import numpy as np
    from PIL import Image, ImageOps

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            pil = im.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or not arr.size:
            raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
        if arr.dtype.kind in "fc" and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        pil = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).astype("uint8")).convert("RGB")
    return np.asarray(ImageOps.contain(pil, (box, box)))
