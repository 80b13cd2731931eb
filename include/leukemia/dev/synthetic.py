"""Seeded synthetic peripheral-blood-smear images, so tests and the demo run without the real data.

Each image is a stained smear field: a pale pinkish background with vignette and noise, many red
blood cells with a central pallor, and one or more white cells. The class shows only in the white
cells' morphology, loosely after the public ALL blood-smear data set:

- Benign: small mature lymphocytes (dense, dark, round nucleus; thin cytoplasm rim), sometimes two,
  sometimes beside a segmented neutrophil.
- Early: medium blasts, high nucleus-to-cytoplasm ratio, round nucleus with fine stippled chromatin.
- Pre: larger blasts, indented (cleft) nucleus, more cytoplasm with vacuoles.
- Pro: the largest blasts, irregular nucleus with 1-3 pale nucleoli, deeper-blue cytoplasm.

Stain strength, background tint, blur and noise are drawn the same way for every class, so no
global colour gives the label away. For the shortcut audit's tests, `generate(overlay=True)` stamps a
class-correlated scale-bar overlay in the bottom-right corner (as the public images have), and
`informative_cells=False` draws each image's white cells from a random class, so that only the
overlay tells the label; `background_tint=True` shifts each class's colours a little (`TINTS`), as
one acquisition session's stain and camera do. Fields are drawn at twice the size and downsampled, which
anti-aliases the edges; every length is a fraction of the image side, so any size >= 32 works.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from leukemia.config import CLASSES
from leukemia.model import overlay_start

log = logging.getLogger(__name__)

MIN_SIZE = 32
_SS = 2  # supersampling factor
_CHROMATIN_MAX = 0.6  # chromatin amplitude that a full (255) nucleus mask stands for

RGB = tuple[int, int, int]
Polygon = list[tuple[float, float]]


@dataclass(frozen=True)
class _Look:
    """How the white cells of one class look; lengths are fractions of the image side."""

    diameter: tuple[float, float]
    nc_ratio: tuple[float, float]  # nucleus radius / cell radius
    nucleus: RGB
    cytoplasm: RGB
    shape: str  # round | cleft | irregular
    chromatin: float  # amplitude of the stippled chromatin texture, 0 (smooth) to 0.6
    nucleoli: tuple[int, int] = (0, 0)
    vacuoles: tuple[int, int] = (0, 0)


_LOOKS: dict[str, _Look] = {
    "Benign": _Look(
        diameter=(0.195, 0.24),
        nc_ratio=(0.80, 0.88),
        nucleus=(62, 28, 96),
        cytoplasm=(168, 182, 214),
        shape="round",
        chromatin=0.05,
    ),
    "Early": _Look(
        diameter=(0.30, 0.34),
        nc_ratio=(0.90, 0.95),
        nucleus=(150, 92, 184),
        cytoplasm=(110, 140, 205),
        shape="round",
        chromatin=0.55,
    ),
    "Pre": _Look(
        diameter=(0.415, 0.47),
        nc_ratio=(0.50, 0.58),
        nucleus=(80, 46, 128),
        cytoplasm=(140, 162, 214),
        shape="cleft",
        chromatin=0.15,
        vacuoles=(4, 8),
    ),
    "Pro": _Look(
        diameter=(0.505, 0.575),
        nc_ratio=(0.62, 0.72),
        nucleus=(118, 80, 162),
        cytoplasm=(78, 108, 186),
        shape="irregular",
        chromatin=0.26,
        nucleoli=(1, 3),
    ),
}


class _Cell(NamedTuple):
    """A white cell planned in the field: what it is, where, how big (in supersampled pixels)."""

    kind: str  # blast (the class's own cell) | neutrophil
    x: float
    y: float
    r: float


def _check_label(label: str) -> None:
    if label not in _LOOKS:
        raise ValueError(f"unknown class {label!r}: expected one of {', '.join(_LOOKS)}")


def _check_size(size: int) -> None:
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE} pixels, got {size!r}")


def _outline(
    cx: float,
    cy: float,
    r: float,
    theta: np.ndarray,
    radial: np.ndarray | float = 1.0,
    aspect: float = 1.0,
    angle: float = 0.0,
) -> Polygon:
    """Polygon of a rotated ellipse whose radius is scaled by `radial` at each angle."""
    x = r * radial * np.cos(theta) * aspect
    y = r * radial * np.sin(theta) / aspect
    ca, sa = np.cos(angle), np.sin(angle)
    return list(zip((cx + ca * x - sa * y).tolist(), (cy + sa * x + ca * y).tolist(), strict=True))


def _jitter(
    colour: RGB | np.ndarray, shift: np.ndarray | float, rng: np.random.Generator, sd: float
) -> RGB:
    """`colour` moved by the image's stain `shift` plus a little per-element noise."""
    c = np.clip(np.asarray(colour, dtype=np.float32) + shift + rng.normal(0.0, sd, 3), 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


def _darker(colour: RGB, factor: float) -> RGB:
    return int(colour[0] * factor), int(colour[1] * factor), int(colour[2] * factor)


def _noise_field(rng: np.random.Generator, grid: int, side: int) -> np.ndarray:
    """Smooth unit-variance noise: a grid x grid normal field upsampled to side x side."""
    small = Image.fromarray(rng.standard_normal((grid, grid)).astype(np.float32), mode="F")
    return np.asarray(small.resize((side, side), Image.BILINEAR))


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Pale pinkish-beige field with a vignette and slow brightness variation."""
    tint = rng.normal(0.0, [12.0, 15.0, 15.0]) + rng.normal(0.0, 13.0)
    base = np.array([234.0, 220.0, 216.0]) + tint
    ax = np.linspace(-1.0, 1.0, side, dtype=np.float32)
    r2 = ax[None, :] ** 2 + ax[:, None] ** 2
    shade = 1.0 - rng.uniform(0.02, 0.10) * r2 + 0.015 * _noise_field(rng, 5, side)
    return shade[..., None] * base.astype(np.float32)


def _red_cells(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    side: int,
    bg: np.ndarray,
    shift: np.ndarray,
    white: list[_Cell],
) -> None:
    """Pink-red discs of varying size with a pale centre, some overlapping or clipped by the border;
    they fill the field around the white cells, which push them aside as in a monolayer."""
    r_mean = side * rng.uniform(0.045, 0.057)
    coverage = rng.uniform(0.25, 0.45)
    free = side * side - sum(np.pi * c.r**2 for c in white)
    n = max(4, int(coverage * free / (np.pi * r_mean**2)))
    rbc = np.array([226.0, 166.0, 169.0]) + shift + rng.normal(0.0, [6.0, 8.0, 8.0])
    theta = np.linspace(0.0, 2 * np.pi, 24, endpoint=False)
    xs = rng.uniform(-r_mean, side + r_mean, 3 * n)
    ys = rng.uniform(-r_mean, side + r_mean, 3 * n)
    outside = np.ones(3 * n, dtype=bool)
    for c in white:
        outside &= np.hypot(xs - c.x, ys - c.y) > c.r + 0.4 * r_mean
    xs, ys = xs[outside][:n], ys[outside][:n]
    n = len(xs)
    rs = r_mean * rng.uniform(0.82, 1.18, n)
    aspects = rng.uniform(1.0, 1.12, n)
    angles = rng.uniform(0.0, np.pi, n)
    pallor = rng.uniform(0.35, 0.5)
    for x, y, r, a, ang in zip(xs, ys, rs, aspects, angles, strict=True):
        fill = _jitter(rbc, 0.0, rng, 5.0)
        draw.polygon(
            _outline(x, y, r, theta, aspect=a, angle=ang), fill=fill, outline=_darker(fill, 0.9)
        )
        pale = tuple(int(v) for v in 0.55 * bg + 0.45 * np.asarray(fill))
        draw.polygon(_outline(x, y, r * pallor, theta, aspect=a, angle=ang), fill=pale)


def _nucleus_radial(shape: str, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Radius profile of a nucleus: round, indented (cleft) or irregular."""
    radial = np.ones_like(theta)
    for k in range(2, 4):  # every nucleus is a little uneven
        radial += rng.uniform(0.0, 0.03) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if shape == "cleft":
        centre, width = rng.uniform(0, 2 * np.pi), rng.uniform(0.28, 0.4)
        d = np.angle(np.exp(1j * (theta - centre)))
        radial -= rng.uniform(0.45, 0.6) * np.exp(-0.5 * (d / width) ** 2)
    elif shape == "irregular":
        for k in range(2, 7):
            amp = rng.uniform(0.04, 0.10) / np.sqrt(k - 1)
            radial += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return radial


def _place(
    rng: np.random.Generator, side: int, r: float, taken: list[_Cell]
) -> tuple[float, float]:
    """A centre for a white cell: the first near the middle (as in the data set's crops), others
    apart from those before."""
    lo, hi = (0.18, 0.82) if taken else (0.4, 0.6)
    x, y = side / 2, side / 2
    for _ in range(30):
        x, y = rng.uniform(lo, hi, 2) * side
        if all(np.hypot(x - c.x, y - c.y) > 1.05 * (r + c.r) for c in taken):
            break
    return x, y


def _plan_white_cells(label: str, look: _Look, rng: np.random.Generator, side: int) -> list[_Cell]:
    """Kind, centre and radius of each white cell in the field."""
    kinds = ["blast"]
    if label == "Benign" and rng.random() < 0.3:
        kinds.append("blast")
    if label == "Benign" and rng.random() < 0.3:
        kinds.append("neutrophil")
    cells: list[_Cell] = []
    for kind in kinds:
        diameter = (0.24, 0.28) if kind == "neutrophil" else look.diameter
        r = side * rng.uniform(*diameter) / 2
        cells.append(_Cell(kind, *_place(rng, side, r, cells), r))
    return cells


def _blast(
    draw: ImageDraw.ImageDraw,
    mask: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    look: _Look,
    cell: _Cell,
    shift: np.ndarray,
    late: list[tuple[Polygon, RGB]],
) -> None:
    """Cytoplasm, vacuoles and nucleus of one white cell; its nucleoli go to `late`, to be drawn
    over the chromatin texture."""
    cx, cy, rc = cell.x, cell.y, cell.r
    theta = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    edge = 1.0 + 0.03 * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
    cyto = _jitter(look.cytoplasm, shift, rng, 5.0)
    draw.polygon(
        _outline(cx, cy, rc, theta, edge, angle=rng.uniform(0, np.pi)),
        fill=cyto,
        outline=_darker(cyto, 0.9),
    )
    rn = rc * rng.uniform(*look.nc_ratio)
    off, direction = rng.uniform(0.2, 0.7) * (rc - rn), rng.uniform(0, 2 * np.pi)
    nx, ny = cx + off * np.cos(direction), cy + off * np.sin(direction)
    pale = _jitter((236, 232, 240), 0.0, rng, 3.0)
    for _ in range(rng.integers(look.vacuoles[0], look.vacuoles[1] + 1)):
        rv = rc * rng.uniform(0.08, 0.13)
        a = rng.uniform(0, 2 * np.pi)
        d = rc * rng.uniform(0.55, 0.85)
        vx, vy = cx + d * np.cos(a), cy + d * np.sin(a)
        draw.ellipse((vx - rv, vy - rv, vx + rv, vy + rv), fill=pale)
    radial = _nucleus_radial(look.shape, theta, rng)
    poly = _outline(
        nx, ny, rn, theta, radial, aspect=rng.uniform(1.0, 1.08), angle=rng.uniform(0, np.pi)
    )
    draw.polygon(poly, fill=_jitter(look.nucleus, shift, rng, 5.0))
    mask.polygon(poly, fill=int(255 * look.chromatin / _CHROMATIN_MAX))
    small = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
    nucleolus = _jitter((192, 172, 218), shift, rng, 5.0)
    for _ in range(rng.integers(look.nucleoli[0], look.nucleoli[1] + 1)):
        ro = rn * rng.uniform(0.16, 0.24)
        a, d = rng.uniform(0, 2 * np.pi), rn * rng.uniform(0.0, 0.5)
        spot = _outline(
            nx + d * np.cos(a),
            ny + d * np.sin(a),
            ro,
            small,
            aspect=rng.uniform(1.0, 1.2),
            angle=rng.uniform(0, np.pi),
        )
        late.append((spot, nucleolus))


def _neutrophil(
    draw: ImageDraw.ImageDraw,
    mask: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    cell: _Cell,
    shift: np.ndarray,
) -> None:
    """A segmented neutrophil: granular pale cytoplasm and a 3-4 lobed dark nucleus."""
    cx, cy, rc = cell.x, cell.y, cell.r
    theta = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)
    cyto = _jitter((214, 190, 206), shift, rng, 5.0)
    draw.polygon(_outline(cx, cy, rc, theta), fill=cyto, outline=_darker(cyto, 0.92))
    granule = _jitter((176, 130, 170), shift, rng, 5.0)
    for _ in range(40):
        a, d = rng.uniform(0, 2 * np.pi), rc * np.sqrt(rng.uniform(0, 0.85))
        gx, gy, g = cx + d * np.cos(a), cy + d * np.sin(a), rc * 0.03
        draw.ellipse((gx - g, gy - g, gx + g, gy + g), fill=granule)
    lobes = int(rng.integers(3, 5))
    start, arc = rng.uniform(0, 2 * np.pi), rng.uniform(1.6, 2.6)
    nuc = _jitter((70, 34, 104), shift, rng, 5.0)
    angles = start + arc * np.arange(lobes) / (lobes - 1)
    centres = list(
        zip(
            (cx + 0.45 * rc * np.cos(angles)).tolist(),
            (cy + 0.45 * rc * np.sin(angles)).tolist(),
            strict=True,
        )
    )
    draw.line(centres, fill=nuc, width=max(1, int(rc * 0.12)))
    for x, y in centres:
        rl = rc * rng.uniform(0.22, 0.3)
        draw.ellipse((x - rl, y - rl, x + rl, y + rl), fill=nuc)
        mask.ellipse((x - rl, y - rl, x + rl, y + rl), fill=9)  # dense, nearly smooth


def render_smear(label: str, rng: np.random.Generator, size: int = 224) -> Image.Image:
    """Draw one size x size RGB smear field whose white cells show the morphology of `label`."""
    _check_label(label)
    _check_size(size)
    side = _SS * size
    look = _LOOKS[label]
    bg = _background(rng, side)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    shift = rng.normal(0.0, 6.0, 3)  # stain hue shared by every element of this image
    white = _plan_white_cells(label, look, rng, side)
    _red_cells(draw, rng, side, bg.reshape(-1, 3).mean(axis=0), shift, white)

    mask_img = Image.new("L", (side, side), 0)  # chromatin texture amplitude, nuclei only
    mask = ImageDraw.Draw(mask_img)
    late: list[tuple[Polygon, RGB]] = []
    for cell in white:
        if cell.kind == "neutrophil":
            _neutrophil(draw, mask, rng, cell, shift)
        else:
            _blast(draw, mask, rng, look, cell, shift, late)

    # stippled chromatin; the grain is ~1 px at 64 px and ~2 px at 224 px
    amp = np.asarray(mask_img, dtype=np.float32) * (_CHROMATIN_MAX / 255.0)
    grain = _noise_field(rng, min(size, 96), side)
    arr = np.asarray(img, dtype=np.float32) * (1.0 + amp * grain)[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    for poly, colour in late:
        draw.polygon(poly, fill=colour)

    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7) * side / 128))
    img = img.reduce(_SS)

    # stain strength and sensor noise, drawn the same way for every class
    strength = rng.uniform(0.925, 1.075) * rng.uniform(0.975, 1.025, 3)
    arr = 255.0 - (255.0 - np.asarray(img, dtype=np.float32)) * strength.astype(np.float32)
    arr += rng.normal(0.0, rng.uniform(1.5, 4.0), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


#: The overlay `generate(overlay=True)` stamps on each class's images, after the public images'
#: styles: a large white box with a black bar, a red bar, a small white box, a dark box.
OVERLAY_STYLES: dict[str, str] = {
    "Benign": "large_box",
    "Early": "red_bar",
    "Pre": "small_box",
    "Pro": "dark_box",
}


def stamp_overlay(image: Image.Image, style: str) -> Image.Image:
    """A copy of `image` with a scale-bar overlay of `style` drawn inside the bottom-right overlay
    square (`model.overlay_start`: the square the model's mask fills)."""
    size = image.size[0]
    s = overlay_start(size)
    side = size - s
    a, b = s + max(1, side // 8), size - 1  # first and last pixel drawn, inside the square
    mid = (a + b) // 2
    out = image.copy()
    draw = ImageDraw.Draw(out)
    if style == "large_box":
        draw.rectangle((a, a, b, b), fill=(255, 255, 255))
        draw.rectangle((a + 1, mid, b, mid + max(1, side // 6)), fill=(0, 0, 0))
    elif style == "red_bar":
        draw.rectangle((a, mid - 1, b, mid + 1), fill=(220, 20, 30))
        draw.rectangle((a, a, a + 1, b), fill=(220, 20, 30))
    elif style == "small_box":
        draw.rectangle((mid - 1, mid - 1, b, b), fill=(255, 255, 255))
        draw.rectangle((mid, mid + 1, b - 1, mid + 2), fill=(30, 30, 30))
    elif style == "dark_box":
        draw.rectangle((a, a, b, b), fill=(20, 20, 20))
    else:
        raise ValueError(
            f"unknown overlay style {style!r}: expected one of {sorted(set(OVERLAY_STYLES.values()))}"
        )
    return out


#: The colour shift `generate(background_tint=True)` gives each class's images (RGB, added).
TINTS: dict[str, tuple[float, float, float]] = {
    "Benign": (12.0, 0.0, -12.0),
    "Early": (-12.0, 0.0, 12.0),
    "Pre": (0.0, 12.0, -6.0),
    "Pro": (0.0, -12.0, 6.0),
}


def tint(image: Image.Image, label: str) -> Image.Image:
    """A copy of `image` with the class's `TINTS` shift added to every pixel."""
    arr = np.asarray(image, dtype=np.float32) + np.asarray(TINTS[label], dtype=np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def _image_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """One stream per (seed, class, index): a class's images do not depend on the other classes."""
    return np.random.default_rng([seed, list(_LOOKS).index(label), index])


def generate(
    out_dir: str | Path,
    n_per_class: int,
    size: int = 224,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    quality: int = 90,
    overlay: bool = False,
    informative_cells: bool = True,
    background_tint: bool = False,
) -> list[Path]:
    """Write n_per_class JPEGs per class as out_dir/<Class>/synthetic-<class>-<NNNN>.jpg (the
    public data set's layout); return the paths, sorted.

    `overlay`: stamp the class's `OVERLAY_STYLES` overlay in the bottom-right corner.
    `informative_cells=False`: draw each image's white cells from a random class (seeded), so the
    cells say nothing of the label (with `overlay`, only the overlay does).
    `background_tint`: shift the class's colours by its `TINTS` (before the overlay is stamped).
    """
    if isinstance(classes, str):
        classes = [classes]
    if int(n_per_class) != n_per_class or n_per_class < 1:
        raise ValueError(f"n_per_class must be an integer >= 1, got {n_per_class!r}")
    _check_size(size)
    if not classes:
        raise ValueError(f"classes must name at least one of {', '.join(_LOOKS)}")
    for label in classes:
        _check_label(label)
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must not repeat, got {list(classes)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be a JPEG quality from 1 to 100, got {quality!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed!r}")

    out = Path(out_dir)
    paths: list[Path] = []
    for label in classes:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(int(n_per_class)):
            path = folder / f"synthetic-{label.lower()}-{i:04d}.jpg"
            rng = _image_rng(seed, label, i)
            cells = label if informative_cells else str(rng.choice(list(_LOOKS)))
            image = render_smear(cells, rng, size)
            if background_tint:
                image = tint(image, label)
            if overlay:
                image = stamp_overlay(image, OVERLAY_STYLES[label])
            image.save(path, "JPEG", quality=quality)
            paths.append(path)
    log.info(
        "Wrote %d synthetic %dpx smears per class of %s under %s",
        n_per_class,
        size,
        ", ".join(classes),
        out,
    )
    return sorted(paths)
