"""Reading images, in one place: which names are images, the images of a folder, checks, decoding.

The sync, feature extraction, prediction (and batch scoring, through it) and the plots all read
images through here, so an image is checked, converted to RGB and resized the same way everywhere
(cached features and the saved model depend on it). numpy and Pillow are imported inside the
functions that need them.

Images wider than 8 bits a sample are scaled to 8 bits by `to_rgb`, never clipped:

- 16-bit integer (Pillow modes I;16, I;16L, I;16B, as 16-bit grey PNG and TIFF open): value / 257,
  rounded, so 0..65535 maps onto 0..255. The scale is the bit depth, not the image's own range, so the
  same value always gives the same pixel. 16-bit RGB(A) PNG and TIFF are scaled by Pillow itself as
  it reads them (to the high byte, within 1 of value / 257).
- 32-bit integer (mode I) and 32-bit float (mode F) have no known full scale, so the range of the
  data decides: float within 0..1 is multiplied by 255; values within 0..255 are kept; values within
  0..65535 are scaled as 16-bit. The choice is per image (a 16-bit-range image whose brightest pixel
  is below 256 is taken as 8-bit data).
- Anything else (negative values, values above 65535, NaN or infinity) cannot be converted
  faithfully: ImageRejected, with the range found. TIFFs Pillow cannot open (floating-point colour,
  64-bit samples) are rejected too.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

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


#: The largest value of a sample in each data range `to_rgb` knows the scale of, and that scale.
_KNOWN_RANGES = ((1.0, 255.0), (255.0, 1.0), (65535.0, 1 / 257))
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


def _is_wide(mode: str) -> bool:
    """True for Pillow modes with samples wider than 8 bits (I;16*, I, F)."""
    return mode in ("I", "F") or mode.startswith("I;")


def _eight_bit(img: Image.Image) -> Image.Image:
    """A wide single-band image (I;16*, I, F) as 8-bit grey, scaled by the module's rule."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img)
    if arr.dtype == np.uint16:  # a known bit depth: its full range, whatever the image holds
        scale = 1 / 257
    else:
        kind = "32-bit float" if arr.dtype.kind == "f" else f"{arr.dtype.itemsize * 8}-bit integer"
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise ImageRejected(
                f"cannot convert a {kind} image to 8-bit faithfully: NaN or infinite values in "
                f"{bad:,} of {arr.size:,} pixels; save it as an 8- or 16-bit image"
            )
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        ranges = _KNOWN_RANGES if arr.dtype.kind == "f" else _KNOWN_RANGES[1:]
        scale = next((s for top, s in ranges if high <= top), None)
        if low < 0 or scale is None:
            known = ", ".join(f"0-{top:g}" for top, _ in ranges)
            raise ImageRejected(
                f"cannot convert a {kind} image to 8-bit faithfully: values span {low:g} to "
                f"{high:g}, outside the ranges with a known scale ({known}); save it as an 8- or "
                "16-bit image"
            )
    pixels = np.rint(arr.astype("float32") * np.float32(scale))
    return Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB: wide samples scaled by the module's rule, never clipped.

    Raises ImageRejected when the samples cannot be converted faithfully.
    """
    return (_eight_bit(img) if _is_wide(img.mode) else img).convert("RGB")


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
            if _is_wide(img.mode):
                _eight_bit(img)  # raises ImageRejected when it cannot be converted faithfully
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        if data.startswith(_TIFF_MAGIC):
            raise ImageRejected(
                "not an image Pillow can read: a TIFF whose sample format it does not support "
                "(e.g. floating-point colour or 64-bit samples); save it as 8- or 16-bit RGB"
            ) from None
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
    """An image as float32 RGB pixels 0-255 of shape (size, size, 3) (`to_rgb`), resized bilinearly
    if needed.

    The one conversion every model input goes through: training features, prediction, Grad-CAM.
    """
    import numpy as np
    from PIL import Image

    with open_image(source, limits) as img:
        img = to_rgb(img)
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
            pil = to_rgb(im)
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


def load_images(paths: Sequence[str | Path], size: int) -> Any:
    """A batch of images (paths or `s3://` URIs, fetched in parallel) as one float32 array
    (n, size, size, 3), each decoded by `images.load_image`."""
    import numpy as np

    from leukemia.objectstore import read_all

    if not paths:
        return np.zeros((0, size, size, 3), dtype="float32")
    datas = read_all(paths)
    return np.stack([load_image(io.BytesIO(d), size) for d in datas])
