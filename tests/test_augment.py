"""Stain and background augmentation: seeded per image and copy, background patches only along the
border, HED jitter through scikit-image's colour deconvolution."""

from __future__ import annotations

import numpy as np
import pytest

from leukemia.augment import AugmentConfig, augment_batch, border_box, copy_seed, hed_jitter

SIZE = 64


def _images(n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(60, 250, size=(n, SIZE, SIZE, 3)).astype("float32")


def test_a_copy_depends_only_on_the_image_sha_and_copy_number() -> None:
    pixels, shas = _images(), ["a" * 64, "b" * 64, "c" * 64]
    first = augment_batch(pixels, shas, copy=0)
    np.testing.assert_array_equal(first, augment_batch(pixels, shas, copy=0))
    assert not np.allclose(first, augment_batch(pixels, shas, copy=1))
    assert not np.allclose(first, pixels)
    assert first.dtype == np.float32 and first.min() >= 0 and first.max() <= 255
    assert copy_seed("a" * 64, 0) != copy_seed("a" * 64, 1) != copy_seed("b" * 64, 0)


def test_background_patches_touch_the_border_and_leave_the_centre_alone() -> None:
    still = AugmentConfig(hed_sigma=0, hed_shift=0, brightness=0, contrast=0, transpose=False)
    pixels = np.stack([np.full((SIZE, SIZE, 3), v, "float32") for v in (10.0, 200.0)])
    out = augment_batch(pixels, ["a" * 64, "b" * 64], copy=0, cfg=still)
    for image, donor_value in zip(out, (200.0, 10.0), strict=True):
        changed = np.argwhere(image[..., 0] == donor_value)
        assert len(changed)  # at least one patch of the other image
        centre = image[SIZE // 2 - 4 : SIZE // 2 + 4, SIZE // 2 - 4 : SIZE // 2 + 4]
        assert (centre != donor_value).all()  # 2/7 of a side at most: never the middle
    rng = np.random.default_rng(1)
    for _ in range(200):
        rows, cols = border_box(rng, SIZE, AugmentConfig())
        assert rows.start == 0 or rows.stop == SIZE or cols.start == 0 or cols.stop == SIZE
        assert 8 <= rows.stop - rows.start <= 18 and 8 <= cols.stop - cols.start <= 18


def test_hed_jitter_without_a_change_of_density_gives_the_image_back() -> None:
    image = _images(1)[0]
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(hed_jitter(image, rng, 0, 0), image)
    # no change of the densities: the round trip through scikit-image gives the image back
    identity = hed_jitter(image, rng, 1e-12, 1e-12)
    assert np.abs(identity - image).max() < 0.5
    # a pale-blue smear background pixel has negative eosin and DAB densities: scikit-image's
    # rgb2hed clips them, so its own round trip changes the pixel; hed_jitter's does not
    from skimage.color import hed2rgb, rgb2hed

    background = np.full((2, 2, 3), (220.0, 229.0, 248.0), "float32")
    clipped = hed2rgb(rgb2hed(background / 255.0)) * 255.0
    assert np.abs(clipped - background).max() > 10
    assert np.abs(hed_jitter(background, rng, 1e-12, 1e-12) - background).max() < 0.5
    jittered = hed_jitter(image, np.random.default_rng(3), 0.05, 0.005)
    assert 0.5 < np.abs(jittered - image).mean() < 20  # a colour change, not a new image


@pytest.mark.parametrize(
    "kwargs", [{"hed_sigma": 1.5}, {"brightness": -0.1}, {"max_patches": -1}, {"patch_max": 0.9}]
)
def test_bad_augmentation_strengths_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be"):
        AugmentConfig(**kwargs)
