"""Reading images: every reader gives the pixels feature extraction has always given, and the checks
reject what cannot be used with the reason."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukemia.images import (
    ImageLimits,
    ImageRejected,
    decode_image,
    fit_in_box,
    is_image_name,
    iter_folder,
    iter_image_files,
    load_image,
    validate_image,
)


def encoded(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    (img.convert(mode) if mode else img).save(buf, fmt)
    return buf.getvalue()


def reference_pixels(data: bytes, size: int) -> np.ndarray:
    """What `features.load_image` computed before the readers moved (and what the cache holds)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype="float32")


@pytest.mark.parametrize(
    ("fmt", "mode", "side"),
    [
        ("JPEG", None, 61),
        ("PNG", "RGBA", 48),
        ("PNG", "L", 70),
        ("BMP", "P", 48),
        ("TIFF", None, 40),
    ],
)
def test_load_and_decode_give_the_same_pixels_as_feature_extraction_always_did(
    tmp_path: Path, fmt: str, mode: str | None, side: int
) -> None:
    pixels = np.random.default_rng(side).integers(0, 256, (side, side + 3, 3), dtype=np.uint8)
    data = encoded(pixels, fmt, mode)
    path = tmp_path / f"cell.{fmt.lower()}"
    path.write_bytes(data)
    expected = reference_pixels(data, 48)

    from_file = load_image(path, 48)
    from_bytes = decode_image(data, 48)

    assert from_file.dtype == from_bytes.dtype == np.float32
    assert from_file.shape == (48, 48, 3)
    np.testing.assert_array_equal(from_file, expected)
    np.testing.assert_array_equal(from_bytes, expected)


def test_features_load_images_stacks_the_same_pixels(tmp_path: Path) -> None:
    from leukemia.features import load_images

    paths = []
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (50, 50, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(encoded(pixels, "JPEG"))

    batch = load_images(paths, 48)

    assert batch.shape == (3, 48, 48, 3)
    for row, path in zip(batch, paths, strict=True):
        np.testing.assert_array_equal(row, reference_pixels(path.read_bytes(), 48))


def test_decode_image_rejects_bad_bytes_with_the_reason() -> None:
    good = encoded(np.zeros((40, 40, 3), np.uint8), "PNG")
    cases = {
        b"": "empty object",
        b"hello, not an image" * 3: "not an image",
        good[: len(good) // 2]: "corrupt or truncated",
        encoded(np.zeros((20, 40, 3), np.uint8), "PNG"): "too small: 40x20",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageRejected, match=reason):
            decode_image(data, 48)
    assert validate_image(good) == (40, 40)


def test_fit_in_box_keeps_the_aspect_ratio_for_paths_and_arrays(tmp_path: Path) -> None:
    pixels = np.full((30, 60, 3), 200, np.uint8)
    path = tmp_path / "wide.png"
    path.write_bytes(encoded(pixels, "PNG"))

    assert fit_in_box(path, 20).shape == (10, 20, 3)
    assert fit_in_box(pixels / 255.0, 20).shape == (10, 20, 3)  # 0-1 floats are scaled to 0-255
    assert fit_in_box(pixels / 255.0, 20).max() == 200
    with pytest.raises(ValueError, match="HxW, HxWx3 or HxWx4"):
        fit_in_box(np.zeros((4, 4, 2)), 20)


def test_image_names_and_folders(tmp_path: Path) -> None:
    assert is_image_name("a.JPG") and is_image_name("b.tiff") and not is_image_name("c.txt")
    for rel in ["Benign/a.jpg", "early/b.png", "Pro/notes.txt", "Other/c.jpg", "x/.hidden/d.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")

    assert [(label, p.name) for label, p in iter_image_files(tmp_path)] == [
        ("Benign", "a.jpg"),
        ("Early", "b.png"),
    ]
    assert [p.relative_to(tmp_path).as_posix() for p in iter_folder(tmp_path)] == [
        "Benign/a.jpg",
        "Other/c.jpg",
        "early/b.png",
    ]


def test_limits_come_from_the_settings_and_a_bad_value_names_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ImageLimits.from_env() == ImageLimits(max_bytes=50_000_000, max_pixels=25_000_000)
    monkeypatch.setenv("LEUKEMIA_MAX_IMAGE_PIXELS", "1_000")
    assert ImageLimits.from_env().max_pixels == 1000
    monkeypatch.setenv("LEUKEMIA_MAX_IMAGE_BYTES", "5 MB")
    with pytest.raises(
        ValueError, match=r"LEUKEMIA_MAX_IMAGE_BYTES must be a whole number.*'5 MB'"
    ):
        ImageLimits.from_env()


def test_every_reader_checks_the_pixel_cap_from_the_header(tmp_path: Path) -> None:
    limits = ImageLimits(max_bytes=10**6, max_pixels=40 * 40)
    path = tmp_path / "cell.png"
    path.write_bytes(encoded(np.zeros((40, 41, 3), np.uint8), "PNG"))
    too_large = r"image too large: 41x40 = 1,640 pixels, over the cap of 1,600"

    with pytest.raises(ImageRejected, match=too_large):
        load_image(path, 48, limits)
    with pytest.raises(ImageRejected, match=too_large):
        decode_image(path.read_bytes(), 48, limits)
    with pytest.raises(ImageRejected, match="too large: .* bytes, over the cap of 10"):
        validate_image(path.read_bytes(), ImageLimits(max_bytes=10, max_pixels=10**6))
    assert load_image(path, 48, ImageLimits(10**6, 41 * 40)).shape == (48, 48, 3)


# --- wide samples: 16-bit, 32-bit integer and float images are scaled to 8 bits, never clipped -----

SIDE = 256  # load at the file's own size: no resize between the samples and the pixels checked


def gradient16() -> np.ndarray:
    """A horizontal 16-bit gradient 0..65535, one column per step, SIDE x SIDE."""
    row = np.rint(np.linspace(0, 65535, SIDE)).astype(np.uint16)
    return np.tile(row, (SIDE, 1))


def pillow_file(arr: np.ndarray, path: Path) -> Path:
    Image.fromarray(arr).save(path)  # uint16 → mode I;16, written as 16-bit by PNG and TIFF
    return path


def tiff_file(arr: np.ndarray, path: Path, **kwargs: object) -> Path:
    import tifffile

    tifffile.imwrite(path, arr, **kwargs)
    return path


def read_all_ways(path: Path) -> list[np.ndarray]:
    """The pixels of `path` from every reader: features (`load_image`), prediction and scoring
    (`decode_image`, through `predict._load`), and the pictures (`fit_in_box`)."""
    from leukemia.predict import _load, file_source

    limits = ImageLimits.from_env()
    return [
        load_image(path, SIDE),
        decode_image(path.read_bytes(), SIDE),
        _load(file_source(path), SIDE, limits),
        fit_in_box(path, SIDE).astype(np.float32),
    ]


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("grey16.png", pillow_file),
        ("grey16.tif", pillow_file),
        ("grey16-big-endian.tif", lambda a, p: tiff_file(a, p, byteorder=">")),
    ],
    ids=["png-pillow", "tiff-pillow", "tiff-tifffile-big-endian"],
)
def test_16bit_grey_gradient_is_scaled_by_value_over_257_not_saturated(
    tmp_path: Path, name: str, write: Callable[[np.ndarray, Path], Path]
) -> None:
    samples = gradient16()
    path = write(samples, tmp_path / name)
    expected = np.rint(samples / 257.0)

    for pixels in read_all_ways(path):
        assert pixels.shape == (SIDE, SIDE, 3)
        for channel in range(3):
            np.testing.assert_array_equal(pixels[:, :, channel], expected)
        assert abs(pixels.mean() - 127.5) < 0.5  # was 254: 99.6 % of the pixels clipped to 255
        assert (pixels == 255).mean() < 0.01  # only the last column
    assert validate_image(path.read_bytes()) == (SIDE, SIDE)


def test_16bit_scale_is_fixed_so_a_dark_image_stays_dark(tmp_path: Path) -> None:
    dark = np.full((40, 40), 2570, np.uint16)  # 2570 / 257 = 10, whatever else the image holds
    pixels = load_image(pillow_file(dark, tmp_path / "dark.png"), 40)
    assert np.unique(pixels).tolist() == [10.0]


def test_16bit_rgb_tiff_tracks_value_over_257_in_every_channel(tmp_path: Path) -> None:
    g = gradient16()
    samples = np.stack([g, g // 2, 65535 - g], axis=-1)
    path = tiff_file(samples, tmp_path / "rgb16.tif", photometric="rgb")

    for pixels in read_all_ways(path):
        assert np.abs(pixels - samples / 257.0).max() <= 1.0  # Pillow keeps the high byte
        assert (pixels[:, :, 0] == 255).mean() < 0.01


def test_float_tiff_in_0_to_1_is_multiplied_by_255(tmp_path: Path) -> None:
    samples = (gradient16() / 65535.0).astype(np.float32)
    path = tiff_file(samples, tmp_path / "float.tif")

    for pixels in read_all_ways(path):
        np.testing.assert_array_equal(pixels[:, :, 1], np.rint(samples * np.float32(255)))
        assert abs(pixels.mean() - 127.5) < 0.5  # was 0.4: everything but 1.0 became 0


@pytest.mark.parametrize(
    ("dtype", "top", "scale"),
    [
        ("float32", 200.0, 1.0),
        ("int32", 200, 1.0),
        ("float32", 65535.0, 1 / 257),
        ("int32", 65535, 1 / 257),
    ],
    ids=["float-0-200", "int-0-200", "float-0-65535", "int-0-65535"],
)
def test_32bit_int_and_float_within_0_255_are_kept_and_within_0_65535_scaled_as_16bit(
    tmp_path: Path, dtype: str, top: float, scale: float
) -> None:
    samples = np.tile(np.linspace(0, top, SIDE), (SIDE, 1)).astype(dtype)
    path = tiff_file(samples, tmp_path / "wide.tif")
    with Image.open(path) as img:
        assert img.mode == ("F" if dtype == "float32" else "I")

    pixels = load_image(path, SIDE)

    np.testing.assert_array_equal(
        pixels[:, :, 0], np.rint(samples.astype(np.float32) * np.float32(scale))
    )
    assert pixels.max() == (200 if top == 200 else 255)


@pytest.mark.parametrize(
    ("samples", "reason"),
    [
        (
            np.where(np.eye(40) > 0, np.nan, 0.5).astype(np.float32),
            "NaN or infinite values in 40 of 1,600 pixels",
        ),
        (np.full((40, 40), np.inf, np.float32), "NaN or infinite values in 1,600 of 1,600 pixels"),
        (np.linspace(0, 1e6, 1600).reshape(40, 40).astype(np.float32), "values span 0 to 1e\\+06"),
        (np.linspace(-3, 1, 1600).reshape(40, 40).astype(np.float32), "values span -3 to 1"),
        (np.linspace(-5, 100, 1600).reshape(40, 40).astype(np.int32), "values span -5 to 100"),
        (np.linspace(0, 70000, 1600).reshape(40, 40).astype(np.int32), "values span 0 to 70000"),
    ],
    ids=["nan", "inf", "float-1e6", "float-negative", "int-negative", "int-over-65535"],
)
def test_wide_image_that_cannot_be_converted_faithfully_is_rejected_with_the_reason(
    tmp_path: Path, samples: np.ndarray, reason: str
) -> None:
    path = tiff_file(samples, tmp_path / "odd.tif")
    data = path.read_bytes()
    pattern = f"cannot convert a 32-bit (float|integer) image to 8-bit faithfully: {reason}"

    with pytest.raises(ImageRejected, match=pattern):
        validate_image(data)
    with pytest.raises(ImageRejected, match=pattern):
        decode_image(data, 48)
    with pytest.raises(ImageRejected, match=pattern):
        load_image(path, 48)

    from leukemia.predict import _load, file_source

    skipped = _load(file_source(path), 48, ImageLimits.from_env())
    assert skipped.image == str(path) and re.search(pattern, skipped.reason)


def test_tiff_pillow_cannot_open_is_rejected_saying_so(tmp_path: Path) -> None:
    g = gradient16()[:40, :40] / 65535.0
    colour = tiff_file(
        np.stack([g] * 3, -1).astype(np.float32), tmp_path / "c.tif", photometric="rgb"
    )
    double = tiff_file(g.astype(np.float64), tmp_path / "d.tif")

    for path in (colour, double):
        with pytest.raises(ImageRejected, match="a TIFF whose sample format it does not support"):
            validate_image(path.read_bytes())
