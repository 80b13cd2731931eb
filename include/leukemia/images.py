"""Reading images, in one place: which names are images, the images of a folder, checks, decoding.

The sync, feature extraction, prediction and the plots all read images through here, so an image is
checked, converted to RGB and resized the same way everywhere (cached features and the saved model
depend on it). numpy and Pillow are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from leukemia.config import CLASSES, env

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MIN_IMAGE_SIDE = 32
_CLASS_BY_FOLDER = {c.lower(): c for c in CLASSES}


class ImageRejected(ValueError):
    """The bytes are not a usable image; the message is the reason."""


@dataclass(frozen=True)
class ImageLimits:
    """The largest image read: bytes (from a listing or a file size, before reading) and pixels
    (from the header, before decoding). Settings `LEUKEMIA_MAX_IMAGE_BYTES` and `_PIXELS`.

    Defaults, 50 MB and 25 megapixels: the data set's images are 224x224 JPEGs of about 20 KB, and a
    microscope camera frame is 5-20 megapixels (a JPEG of 2-15 MB, a lossless PNG or TIFF up to
    about 50 MB). 25 megapixels decode to 75 MB of RGB, so the sync's 16 workers hold at most about
    0.8 GB of bytes and 1.2 GB of pixels. Pillow's own limit (`Image.MAX_IMAGE_PIXELS`, 89 M) only
    warns below twice its value; here its warning is an error: the cap never goes above it.
    """

    max_bytes: int
    max_pixels: int

    @classmethod
    def from_env(cls) -> ImageLimits:
        """The limits set in the environment, or their documented defaults."""
        return cls(
            _positive_int("LEUKEMIA_MAX_IMAGE_BYTES"), _positive_int("LEUKEMIA_MAX_IMAGE_PIXELS")
        )

    def check_bytes(self, size: int) -> None:
        """ImageRejected when `size` bytes are over the cap."""
        if size > self.max_bytes:
            raise ImageRejected(
                f"too large: {size:,} bytes, over the cap of {self.max_bytes:,} "
                "(raise LEUKEMIA_MAX_IMAGE_BYTES to accept it)"
            )

    def check_pixels(self, width: int, height: int) -> None:
        """ImageRejected when a width x height image is over the pixel cap (or Pillow's limit)."""
        from PIL import Image

        cap = min(self.max_pixels, Image.MAX_IMAGE_PIXELS or self.max_pixels)
        if width * height > cap:
            raise ImageRejected(
                f"image too large: {width}x{height} = {width * height:,} pixels, over the cap of "
                f"{cap:,} (LEUKEMIA_MAX_IMAGE_PIXELS)"
            )


def _positive_int(name: str) -> int:
    text = env(name).replace("_", "")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a whole number above 0, got {env(name)!r}")
    return int(text)


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


@contextmanager
def open_image(
    source: str | Path | BinaryIO, limits: ImageLimits | None = None
) -> Iterator[Image.Image]:
    """Pillow's `Image.open`, rejecting images over the pixel cap from the header, before decoding."""
    from PIL import Image

    with Image.open(source) as img:
        (limits or ImageLimits.from_env()).check_pixels(*img.size)
        yield img


def validate_image(data: bytes, limits: ImageLimits | None = None) -> tuple[int, int]:
    """Decode `data` fully; return (width, height) or raise ImageRejected with the reason."""
    from PIL import Image, UnidentifiedImageError

    limits = limits or ImageLimits.from_env()
    if not data:
        raise ImageRejected("empty object (0 bytes)")
    limits.check_bytes(len(data))
    try:
        with open_image(io.BytesIO(data), limits) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image: Pillow cannot identify it") from None
    except Image.DecompressionBombError as exc:  # not an OSError: would abort the whole sync
        raise ImageRejected(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"corrupt or truncated image: {exc}") from None
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageRejected(f"image too small: {width}x{height}, need at least {MIN_IMAGE_SIDE} px")
    return width, height


def load_image(
    source: str | Path | BinaryIO, size: int, limits: ImageLimits | None = None
) -> np.ndarray:
    """An RGB image as float32 pixels 0-255 of shape (size, size, 3), resized bilinearly if needed.

    The one conversion every model input goes through: training features, prediction, Grad-CAM.
    """
    import numpy as np
    from PIL import Image

    with open_image(source, limits) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype="float32")


def decode_image(data: bytes, size: int, limits: ImageLimits | None = None) -> np.ndarray:
    """Validated RGB float32 pixels (size, size, 3) of image bytes, resized as `load_image` does."""
    limits = limits or ImageLimits.from_env()
    validate_image(data, limits)  # raises ImageRejected with the reason
    return load_image(io.BytesIO(data), size, limits)


def fit_in_box(image: np.ndarray | str | Path, box: int) -> np.ndarray:
    """An RGB uint8 array scaled to fit a `box` pixel square, from a path or an array (0-255 or 0-1).

    For pictures shown to people (plots, contact sheets), not for model inputs.
    """
    import numpy as np
    from PIL import Image, ImageOps

    if isinstance(image, (str, Path)):
        with open_image(image) as im:
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
