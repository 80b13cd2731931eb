"""Reading images: every reader gives the pixels feature extraction has always given, and the checks
reject what cannot be used with the reason."""

from __future__ import annotations

import io
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
