"""Stain and background augmentation of the training images, for the cached-feature grid.

The frozen VGG16 base gives each image one fixed feature row, so "augmenting the cached features"
means: each image the heads train on gets `augment_copies` extra rows, the features of randomly
changed copies of it, computed once by the extraction shards and cached beside the originals
(`features.augmented_dir`). A head then trains on the originals and their copies (same label) and is
validated, cross-validated and tested on originals only.

One copy of an image, in this order (`augment_image`):

1. **Background patches** (the background cue: each class of the public data comes from a few
   acquisition sessions): 1-2 rectangles along the image's border, 1/8-2/7 of a side each, pasted
   at the same place from another image of the batch. The middle of the image stays; the border
   now mixes slides, so no border patch tells the class.
2. **Transpose** with probability 1/2: a label-preserving reflection that keeps the overlay square
   (bottom-right) where the model's mask is.
3. **HED stain jitter** (the stain cue), the standard histology augmentation (Tellez et al. 2018,
   "H and E stain augmentation improves generalization of convolutional networks for histopathological
   mitosis detection"; Tellez et al. 2019, "Quantifying the effects of data augmentation and stain
   color normalization..."): colour deconvolution into haematoxylin, eosin and DAB optical densities
   with scikit-image's stain matrix (`skimage.color.hed_from_rgb`, Ruifrok & Johnston), each
   density scaled by U(1-σ, 1+σ) and shifted by U(-s, s), and back (`hed_jitter`).
4. **Brightness and contrast** (illumination, camera): each image's pixels scaled by U(1-b, 1+b)
   and spread about their mean by U(1-c, 1+c).

Two copies (`config.RUN_DEFAULTS.augment_copies`) brought the share of test predictions that a pasted
background patch of another class changes within 1 % for both heads, at no cost in accuracy
(`bench/shortcuts.py`, bench/RESULTS.md).

Each copy is seeded by the image's sha256 and the copy's number (the donor of its patches is drawn
from the images extracted with it). Pure numpy + scikit-image: no model, no storage here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Part of the cache folder's name: change it whenever `augment_image` changes what it makes.
AUGMENT_VERSION = "v1"


@dataclass(frozen=True)
class AugmentConfig:
    """How strong each augmentation is (defaults: HED-light of Tellez et al. 2019, mild lighting)."""

    hed_sigma: float = 0.05  # scale of each stain density: U(1 - σ, 1 + σ)
    hed_shift: float = 0.005  # shift of each density, in scikit-image's units (log10 OD / 6)
    brightness: float = 0.10
    contrast: float = 0.10
    max_patches: int = 2  # background rectangles pasted per copy (1..max_patches)
    patch_min: float = 1 / 8  # a rectangle's side, as a share of the image's side
    patch_max: float = 2 / 7
    transpose: bool = True

    def __post_init__(self) -> None:
        if (
            not 0 <= self.hed_sigma < 1
            or not 0 <= self.brightness < 1
            or not 0 <= self.contrast < 1
        ):
            raise ValueError(
                "hed_sigma, brightness and contrast must be in [0, 1), got "
                f"{self.hed_sigma}, {self.brightness}, {self.contrast}"
            )
        if self.max_patches < 0 or not 0 < self.patch_min <= self.patch_max <= 0.5:
            raise ValueError(
                "max_patches must be >= 0 and 0 < patch_min <= patch_max <= 0.5, got "
                f"{self.max_patches}, {self.patch_min}, {self.patch_max}"
            )


def copy_seed(sha256: str, copy: int) -> int:
    """The seed of copy `copy` of one image: the same on every worker and every retry."""
    return int.from_bytes(hashlib.sha256(f"{sha256}:{copy}".encode()).digest()[:8], "little")


def border_box(rng: Any, size: int, cfg: AugmentConfig) -> tuple[slice, slice]:
    """A random rectangle touching one of the image's four edges."""
    low, high = max(1, round(cfg.patch_min * size)), max(1, round(cfg.patch_max * size))
    h, w = (int(v) for v in rng.integers(low, high + 1, size=2))
    edge = int(rng.integers(4))  # top, bottom, left, right
    if edge < 2:
        top = 0 if edge == 0 else size - h
        left = int(rng.integers(0, size - w + 1))
    else:
        left = 0 if edge == 2 else size - w
        top = int(rng.integers(0, size - h + 1))
    return slice(top, top + h), slice(left, left + w)


def hed_jitter(image: Any, rng: Any, sigma: float, shift: float) -> Any:
    """HED stain jitter of one RGB image (S, S, 3), pixels 0-255 → 0-255 (Tellez et al.).

    The stain vectors are scikit-image's (`skimage.color.hed_from_rgb` / `rgb_from_hed`, Ruifrok
    & Johnston) in its optical-density units, but the densities are not clipped at zero as
    `rgb2hed` clips them: Wright-Giemsa is not H&E, many pixels of the smears have a negative eosin
    density, and clipped, the round trip alone would change every copy in the same way. Unclipped,
    it is exact (tested).
    """
    import numpy as np
    from skimage.color import hed_from_rgb, rgb_from_hed

    if sigma == 0 and shift == 0:
        return image
    log_adjust = np.log(1e-6)  # scikit-image's scale: densities of 0-1 for pixels of 1e-6-1
    density = np.log(np.clip(np.asarray(image, dtype="float64"), 1e-6, 255) / 255.0) / log_adjust
    stains = density @ hed_from_rgb
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-shift, shift, size=3)
    rgb = np.exp(((stains * alpha + beta) @ rgb_from_hed) * log_adjust)
    return np.clip(rgb, 0, 1) * 255.0


def augment_image(image: Any, donor: Any, rng: Any, cfg: AugmentConfig = AugmentConfig()) -> Any:
    """One augmented copy of `image` (S, S, 3, pixels 0-255), background patches from `donor`."""
    import numpy as np

    out = np.array(image, dtype="float32", copy=True)
    size = out.shape[0]
    for _ in range(int(rng.integers(1, cfg.max_patches + 1)) if cfg.max_patches else 0):
        box = border_box(rng, size, cfg)
        out[box] = donor[box]
    if cfg.transpose and rng.random() < 0.5:
        out = out.transpose(1, 0, 2)
    out = hed_jitter(out, rng, cfg.hed_sigma, cfg.hed_shift)
    mean = out.mean(axis=(0, 1), keepdims=True)
    contrast = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    brightness = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    out = ((out - mean) * contrast + mean) * brightness
    return np.clip(out, 0, 255).astype("float32")


def augment_batch(
    pixels: Any, shas: Sequence[str], copy: int, cfg: AugmentConfig = AugmentConfig()
) -> Any:
    """Copy number `copy` of each image of a batch (n, S, S, 3); the donor of each image's
    background patches is another image of the batch (itself when the batch holds one image)."""
    import numpy as np

    out = np.empty_like(np.asarray(pixels, dtype="float32"))
    for i, sha in enumerate(shas):
        rng = np.random.default_rng(copy_seed(sha, copy))
        others = [j for j in range(len(shas)) if shas[j] != sha] or [i]
        donor = pixels[others[int(rng.integers(len(others)))]]
        out[i] = augment_image(pixels[i], donor, rng, cfg)
    return out
