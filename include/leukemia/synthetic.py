"""Seeded synthetic peripheral-blood-smear images, so tests and the demo run without the real data set.

Each image is a stained smear field: a pale pinkish background with vignette and noise, many red blood
cells with a central pallor, and one or more white cells. The class shows only in the white cells'
morphology, loosely after the ALL blood-smear data set:

- Benign: small mature lymphocytes (dense, dark, round nucleus; thin cytoplasm rim), often two, sometimes
  with a segmented neutrophil.
- Early: medium blasts, high nucleus-to-cytoplasm ratio, round nucleus with fine stippled chromatin.
- Pre: larger blasts, indented (cleft) nucleus, more cytoplasm with vacuoles.
- Pro: the largest blasts, irregular nucleus with 1-3 pale nucleoli, deeper-blue cytoplasm.

Stain strength, background tint, blur and noise are drawn the same way for every class, so no global
colour gives the label away. Images are drawn at twice the size and downsampled for anti-aliasing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

try:
    from .config import CLASSES
except ImportError:
    CLASSES: tuple[str, ...] = ("Benign", "Early", "Pre", "Pro")

log = logging.getLogger(__name__)

MIN_SIZE = 32
_SS = 2  # supersampling factor
_RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Blast:
    """How one kind of white cell looks; lengths are fractions of the image side."""

    diameter: tuple[float, float]
    nc_ratio: tuple[float, float]  # nucleus radius / cell radius
    nucleus: _RGB
    cytoplasm: _RGB
    shape: str  # round | cleft | irregular
    chromatin: float  # amplitude of the stippled chromatin texture
    nucleoli: tuple[int, int]
    vacuoles: tuple[int, int]


_CELLS: dict[str, _Blast] = {
    "Benign": _Blast((0.195, 0.24), (0.80, 0.88), (62, 28, 96), (168, 182, 214), "round", 0.05, (0, 0),
                     (0, 0)),
    "Early": _Blast((0.275, 0.32), (0.90, 0.95), (132, 80, 172), (110, 140, 205), "round", 0.40, (0, 0),
                    (0, 0)),
    "Pre": _Blast((0.415, 0.47), (0.56, 0.64), (92, 56, 140), (140, 162, 214), "cleft", 0.22, (0, 0),
                  (4, 8)),
    "Pro": _Blast((0.505, 0.575), (0.62, 0.72), (118, 80, 162), (78, 108, 186), "irregular", 0.26, (1, 3),
                  (0, 0)),
}


def _check_label(label: str) -> None:
    if label not in _CELLS:
        raise ValueError(f"unknown class {label!r}: expected one of {', '.join(CLASSES)}")


def _check_size(size: int) -> None:
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE} pixels, got {size!r}")


def _outline(
    cx: float, cy: float, r: float, theta: np.ndarray, radial: np.ndarray | float = 1.0,
    aspect: float = 1.0, angle: float = 0.0,
) -> list[tuple[float, float]]:
    """Polygon of a rotated ellipse whose radius is scaled by `radial` at each angle."""
    x = r * radial * np.cos(theta) * aspect
    y = r * radial * np.sin(theta) / aspect
    ca, sa = np.cos(angle), np.sin(angle)
    return list(zip((cx + ca * x - sa * y).tolist(), (cy + sa * x + ca * y).tolist()))


def _jitter(colour: _RGB | np.ndarray, shift: np.ndarray, rng: np.random.Generator, sd: float) -> _RGB:
    c = np.asarray(colour, dtype=np.float32) + shift + rng.normal(0.0, sd, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def _noise_field(rng: np.random.Generator, grid: int, side: int) -> np.ndarray:
    """Smooth unit-variance noise: a grid x grid normal field upsampled to side x side."""
    small = Image.fromarray(rng.standard_normal((grid, grid)).astype(np.float32), mode="F")
    return np.asarray(small.resize((side, side), Image.BILINEAR))


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Pale pinkish-beige field with a vignette and slow brightness variation."""
    base = np.array([234.0, 220.0, 216.0]) + rng.normal(0.0, [9.0, 12.0, 12.0]) + rng.normal(0.0, 10.0)
    ax = np.linspace(-1.0, 1.0, side, dtype=np.float32)
    r2 = ax[None, :] ** 2 + ax[:, None] ** 2
    shade = 1.0 - rng.uniform(0.02, 0.10) * r2 + 0.015 * _noise_field(rng, 5, side)
    return shade[..., None] * base.astype(np.float32)


def _red_cells(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int, bg: np.ndarray,
               shift: np.ndarray, white: list[tuple[str, float, float, float]]) -> None:
    """Pink-red discs of varying size, some overlapping or clipped by the border, each with a pallor;
    they fill the field around the white cells, which push them aside as in a monolayer."""
    r_mean = side * rng.uniform(0.045, 0.057)
    coverage = rng.uniform(0.25, 0.45)
    free = side * side - sum(np.pi * rc**2 for _, _, _, rc in white)
    n = max(4, int(coverage * free / (np.pi * r_mean**2)))
    rbc = np.array([226.0, 166.0, 169.0]) + shift + rng.normal(0.0, [6.0, 8.0, 8.0])
    theta = np.linspace(0.0, 2 * np.pi, 24, endpoint=False)
    xs = rng.uniform(-r_mean, side + r_mean, 3 * n)
    ys = rng.uniform(-r_mean, side + r_mean, 3 * n)
    free_spot = np.ones(3 * n, dtype=bool)
    for _, cx, cy, rc in white:
        free_spot &= np.hypot(xs - cx, ys - cy) > rc + 0.4 * r_mean
    xs, ys = xs[free_spot][:n], ys[free_spot][:n]
    n = len(xs)
    rs = r_mean * rng.uniform(0.82, 1.18, n)
    aspects = rng.uniform(1.0, 1.12, n)
    angles = rng.uniform(0.0, np.pi, n)
    pallor = rng.uniform(0.35, 0.5)
    for x, y, r, a, ang in zip(xs, ys, rs, aspects, angles):
        fill = _jitter(rbc, 0.0, rng, 5.0)
        rim = tuple(int(v * 0.9) for v in fill)
        draw.polygon(_outline(x, y, r, theta, aspect=a, angle=ang), fill=fill, outline=rim)
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
            radial += rng.uniform(0.04, 0.10) / np.sqrt(k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return radial


def _place(rng: np.random.Generator, side: int, r: float, taken: list[tuple[float, float, float]],
           first: bool) -> tuple[float, float]:
    """A centre for a white cell that keeps it mostly inside and apart from the others."""
    lo, hi = (0.32, 0.68) if first else (0.18, 0.82)
    best = (side / 2, side / 2)
    for _ in range(30):
        x, y = rng.uniform(lo, hi, 2) * side
        best = (x, y)
        if all(np.hypot(x - tx, y - ty) > 1.05 * (r + tr) for tx, ty, tr in taken):
            break
    return best


def _blast(draw: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw, rng: np.random.Generator,
           spec: _Blast, cx: float, cy: float, rc: float, shift: np.ndarray,
           late: list[tuple[list[tuple[float, float]], _RGB]]) -> None:
    """Cytoplasm, vacuoles and nucleus of one white cell; nucleoli go to `late` (drawn after texture)."""
    theta = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    edge = 1.0 + 0.03 * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
    cyto = _jitter(spec.cytoplasm, shift, rng, 5.0)
    draw.polygon(_outline(cx, cy, rc, theta, edge, angle=rng.uniform(0, np.pi)), fill=cyto,
                 outline=tuple(int(v * 0.9) for v in cyto))
    rn = rc * rng.uniform(*spec.nc_ratio)
    room = rc - rn
    off, direction = rng.uniform(0.2, 0.7) * room, rng.uniform(0, 2 * np.pi)
    nx, ny = cx + off * np.cos(direction), cy + off * np.sin(direction)
    pale = _jitter((236, 232, 240), 0.0, rng, 3.0)
    for _ in range(rng.integers(spec.vacuoles[0], spec.vacuoles[1] + 1)):
        rv = rc * rng.uniform(0.08, 0.13)
        a = rng.uniform(0, 2 * np.pi)
        d = rc * rng.uniform(0.55, 0.85)
        vx, vy = cx + d * np.cos(a), cy + d * np.sin(a)
        draw.ellipse((vx - rv, vy - rv, vx + rv, vy + rv), fill=pale)
    radial = _nucleus_radial(spec.shape, theta, rng)
    poly = _outline(nx, ny, rn, theta, radial, aspect=rng.uniform(1.0, 1.08),
                    angle=rng.uniform(0, np.pi))
    draw.polygon(poly, fill=_jitter(spec.nucleus, shift, rng, 5.0))
    mask.polygon(poly, fill=int(255 * spec.chromatin / 0.6))
    small = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
    nucleolus = _jitter((192, 172, 218), shift, rng, 5.0)
    for _ in range(rng.integers(spec.nucleoli[0], spec.nucleoli[1] + 1)):
        ro = rn * rng.uniform(0.16, 0.24)
        a, d = rng.uniform(0, 2 * np.pi), rn * rng.uniform(0.0, 0.5)
        late.append((_outline(nx + d * np.cos(a), ny + d * np.sin(a), ro, small,
                              aspect=rng.uniform(1.0, 1.2), angle=rng.uniform(0, np.pi)), nucleolus))


def _neutrophil(draw: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw, rng: np.random.Generator,
                cx: float, cy: float, rc: float, shift: np.ndarray) -> None:
    """A segmented neutrophil: granular pale cytoplasm and a 3-4 lobed dark nucleus."""
    theta = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)
    cyto = _jitter((214, 190, 206), shift, rng, 5.0)
    draw.polygon(_outline(cx, cy, rc, theta), fill=cyto, outline=tuple(int(v * 0.92) for v in cyto))
    granule = _jitter((176, 130, 170), shift, rng, 5.0)
    for _ in range(40):
        a, d = rng.uniform(0, 2 * np.pi), rc * np.sqrt(rng.uniform(0, 0.85))
        gx, gy, g = cx + d * np.cos(a), cy + d * np.sin(a), rc * 0.03
        draw.ellipse((gx - g, gy - g, gx + g, gy + g), fill=granule)
    lobes = int(rng.integers(3, 5))
    start, arc = rng.uniform(0, 2 * np.pi), rng.uniform(1.6, 2.6)
    nuc = _jitter((70, 34, 104), shift, rng, 5.0)
    centres = [(cx + 0.45 * rc * np.cos(start + arc * i / (lobes - 1)),
                cy + 0.45 * rc * np.sin(start + arc * i / (lobes - 1))) for i in range(lobes)]
    draw.line(centres, fill=nuc, width=max(1, int(rc * 0.12)))
    for x, y in centres:
        rl = rc * rng.uniform(0.22, 0.3)
        for d in (draw, mask):
            d.ellipse((x - rl, y - rl, x + rl, y + rl), fill=nuc if d is draw else 9)


def _plan_white_cells(label: str, spec: _Blast, rng: np.random.Generator,
                      side: int) -> list[tuple[str, float, float, float]]:
    """Kind, centre and radius of each white cell in the field."""
    kinds = ["blast"]
    if label == "Benign" and rng.random() < 0.3:
        kinds.append("blast")
    if label == "Benign" and rng.random() < 0.3:
        kinds.append("neutrophil")
    taken: list[tuple[float, float, float]] = []
    cells = []
    for kind in kinds:
        if kind == "neutrophil":
            rc = side * rng.uniform(0.24, 0.28) / 2
        else:
            rc = side * rng.uniform(*spec.diameter) / 2
        cx, cy = _place(rng, side, rc, taken, not taken)
        taken.append((cx, cy, rc))
        cells.append((kind, cx, cy, rc))
    return cells


def render_smear(label: str, rng: np.random.Generator, size: int = 224) -> Image.Image:
    """Draw one size x size RGB smear field whose white cells show the morphology of `label`."""
    _check_label(label)
    _check_size(size)
    side = _SS * size
    spec = _CELLS[label]
    bg = _background(rng, side)
    bg_mean = bg.reshape(-1, 3).mean(axis=0)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    shift = rng.normal(0.0, 6.0, 3)  # stain hue shared by every element of this image
    white = _plan_white_cells(label, spec, rng, side)
    _red_cells(draw, rng, side, bg_mean, shift, white)

    mask_img = Image.new("L", (side, side), 0)
    mask = ImageDraw.Draw(mask_img)
    late: list[tuple[list[tuple[float, float]], _RGB]] = []
    for kind, cx, cy, rc in white:
        if kind == "neutrophil":
            _neutrophil(draw, mask, rng, cx, cy, rc, shift)
        else:
            _blast(draw, mask, rng, spec, cx, cy, rc, shift, late)

    # chromatin: fine stippling inside the nuclei, scaled so the grain is ~1 px at 64 and ~2 px at 224
    amp = np.asarray(mask_img, dtype=np.float32) * (0.6 / 255.0)
    grain = _noise_field(rng, min(size, 96), side)
    arr = np.asarray(img, dtype=np.float32) * (1.0 + amp * grain)[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    for poly, colour in late:
        draw.polygon(poly, fill=colour)

    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0) * side / 128))
    img = img.reduce(_SS)

    # stain strength and sensor noise, drawn the same way for every class
    strength = rng.uniform(0.925, 1.075) * rng.uniform(0.975, 1.025, 3)
    arr = 255.0 - (255.0 - np.asarray(img, dtype=np.float32)) * strength.astype(np.float32)
    arr += rng.normal(0.0, rng.uniform(1.5, 4.0), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def _image_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """One independent stream per (seed, class, index), so subsets of classes give the same images."""
    code = CLASSES.index(label) if label in CLASSES else sum(map(ord, label))
    return np.random.default_rng([seed, code, index])


def generate(
    out_dir: str | Path,
    n_per_class: int,
    size: int = 224,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    quality: int = 90,
) -> list[Path]:
    """Write n_per_class JPEGs per class as out_dir/<Class>/synthetic-<class>-<NNNN>.jpg (the public data
    set's layout); return the paths, sorted."""
    if isinstance(classes, str):
        classes = [classes]
    if int(n_per_class) != n_per_class or n_per_class < 1:
        raise ValueError(f"n_per_class must be an integer >= 1, got {n_per_class!r}")
    _check_size(size)
    if not classes:
        raise ValueError(f"classes must name at least one of {', '.join(CLASSES)}")
    for label in classes:
        _check_label(label)
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must not repeat, got {list(classes)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be a JPEG quality between 1 and 100, got {quality!r}")

    out = Path(out_dir)
    paths: list[Path] = []
    for label in classes:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(int(n_per_class)):
            path = folder / f"synthetic-{label.lower()}-{i:04d}.jpg"
            render_smear(label, _image_rng(seed, label, i), size).save(path, "JPEG", quality=quality)
            paths.append(path)
    log.info("Wrote %d synthetic %dpx smears per class for %s under %s", n_per_class, size,
             ", ".join(classes), out)
    return sorted(paths)
