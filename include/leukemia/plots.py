"""Figures logged as MLflow artifacts: confusion matrix, training curves, prediction grid, reliability
diagram, grid comparison.

Every function builds a `matplotlib.figure.Figure` on its own Agg canvas and never imports pyplot, so
no global backend or figure registry is touched and figures can be drawn from several threads. Each
writes a PNG (creating parent folders) and returns its path. matplotlib, numpy and PIL are imported
inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leukemia.config import CLASSES
from leukemia.images import fit_in_box

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
RIGHT, WRONG = "#1a7f37", "#cf222e"

# image grids, in pixels at DPI: each image is scaled to fit a _CELL_PX square under its caption
_CELL_PX, _PAD_PX, _LINE_PX, _CAPTION_PT = 256, 12, 15, 9


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A figure of `width` x `height` inches on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG, release its artists and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1: about 3x faster than the default on photo grids, files about 15% larger
    fig.savefig(path, dpi=DPI, facecolor="white", pil_kwargs={"compress_level": 1})
    fig.clear()
    return path


def _class_name(index: int, what: str) -> str:
    if int(index) != index or not 0 <= index < len(CLASSES):
        raise ValueError(
            f"{what} label {index!r} is not a class index: expected 0..{len(CLASSES) - 1} "
            f"for {', '.join(CLASSES)}"
        )
    return CLASSES[int(index)]


# --- confusion matrix -------------------------------------------------------------------------------


def confusion_matrix_png(
    cm: Sequence[Sequence[int]], path: str | Path, title: str = "Confusion matrix (test)"
) -> Path:
    """Counts and row-normalised percentages per cell (true class = rows), coloured by the percentage."""
    import numpy as np
    from matplotlib import colormaps

    k = len(CLASSES)
    rows = [list(r) for r in cm]
    if len(rows) != k or any(len(r) != k for r in rows):
        shape = f"{len(rows)} rows of lengths {sorted({len(r) for r in rows})}"
        raise ValueError(
            f"confusion matrix must be {k}x{k}, one row and column per class "
            f"({', '.join(CLASSES)}), true classes as rows; got {shape}"
        )
    counts = np.asarray(rows, dtype="float64")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError("confusion matrix counts must be finite and non-negative")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    cmap = colormaps["Blues"]
    fig = _figure(5.6, 4.8)
    ax = fig.add_subplot()
    image = ax.imshow(share * 100, cmap=cmap, vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of true class", shrink=0.85)
    for i in range(k):
        for j in range(k):
            r, g, b, _ = cmap(share[i, j])
            colour = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
            pct = f"{share[i, j]:.1%}" if totals[i, 0] > 0 else "–"
            ax.text(
                j,
                i,
                f"{counts[i, j]:.0f}\n{pct}",
                ha="center",
                va="center",
                color=colour,
                fontsize=10,
            )
    ax.set_xticks(range(k), CLASSES)
    ax.set_yticks(
        range(k), [f"{c}\n(n={t:.0f})" for c, t in zip(CLASSES, totals[:, 0], strict=True)]
    )
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title)
    return _save(fig, path)


# --- training curves --------------------------------------------------------------------------------


def _series(history: Mapping[str, Sequence[float]], *names: str) -> list[float] | None:
    """The first of `names` present in `history` (Keras used `acc` before `accuracy`)."""
    for name in names:
        if name in history and len(history[name]) > 0:
            return [float(v) for v in history[name]]
    return None


def marked_epoch(history: Mapping[str, Sequence[float]]) -> int | None:
    """The epoch the curves mark: the one early stopping kept (`training.best_epoch`); None without
    a (finite) validation loss, when no epoch was chosen on validation."""
    from leukemia.training import best_epoch

    values = _series(history, "val_loss")
    if not any(math.isfinite(v) for v in values or []):
        return None
    return best_epoch(history)


def training_curves_png(
    history: Mapping[str, Sequence[float]], path: str | Path, title: str = ""
) -> Path:
    """Loss and accuracy per epoch, training and validation, with the best epoch (min val_loss) marked."""
    from matplotlib.ticker import MaxNLocator

    best = marked_epoch(history)
    fig = _figure(10, 4)
    panels = (
        ("Loss", ("loss",), ("val_loss",)),
        ("Accuracy", ("accuracy", "acc"), ("val_accuracy", "val_acc")),
    )
    for n, (name, train_keys, val_keys) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, n)
        drawn = False
        for keys, label, style in ((train_keys, "train", "-"), (val_keys, "validation", "--")):
            values = _series(history, *keys)
            if values is not None:
                epochs = range(1, len(values) + 1)
                ax.plot(epochs, values, style, marker="o", markersize=3, label=label)
                drawn = True
        if best is not None:
            ax.axvline(
                best,
                color="grey",
                linestyle=":",
                linewidth=1.5,
                label=f"best epoch {best} (min val_loss)",
            )
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(
                0.5,
                0.5,
                f"no {name.lower()} recorded",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
        ax.set_title(name)
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --- image grids ------------------------------------------------------------------------------------


def _grid_png(
    images: Sequence[np.ndarray | str | Path],
    captions: Sequence[str],
    path: str | Path,
    ncols: int,
    title: str = "",
    colours: Sequence[str] | None = None,
) -> Path:
    """Images in rows of `ncols` (fewer if there are fewer images), each with its caption above.

    Images are placed at pixel offsets with `figimage` (no axes, no layout engine): crisp and fast.
    """
    if len(images) != len(captions):
        raise ValueError(
            f"got {len(images)} images but {len(captions)} captions: expected one each"
        )
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    n = len(images)
    cols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / cols))
    lines = max((str(c).count("\n") + 1 for c in captions), default=1)
    cell_w = _CELL_PX + 2 * _PAD_PX
    caption_h = lines * _LINE_PX + _PAD_PX
    cell_h = _CELL_PX + caption_h + _PAD_PX
    title_h = 2 * _LINE_PX + _PAD_PX if title else _PAD_PX
    width, height = cols * cell_w, nrows * cell_h + title_h
    fig = _figure(width / DPI, height / DPI, layout=None)
    if n == 0:
        fig.text(0.5, 0.5, "no images", ha="center", va="center", color="grey")
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        row, col = divmod(i, cols)
        top = height - title_h - row * cell_h  # pixels from the bottom
        arr = fit_in_box(image, _CELL_PX)
        h, w = arr.shape[:2]
        x0 = col * cell_w + _PAD_PX + (_CELL_PX - w) // 2
        y0 = top - caption_h - _CELL_PX + (_CELL_PX - h) // 2
        fig.figimage(arr, xo=x0, yo=y0, origin="upper", resample=False)
        colour = colours[i] if colours else "black"
        fig.text(
            (col * cell_w + cell_w / 2) / width,
            (top - _PAD_PX / 2) / height,
            str(caption),
            ha="center",
            va="top",
            fontsize=_CAPTION_PT,
            linespacing=1.1,
            color=colour,
            fontweight="bold" if colour == WRONG else "normal",
        )
    if title:
        fig.text(0.5, 1 - _PAD_PX / height, title, ha="center", va="top", fontsize=12)
    return _save(fig, path)


def contact_sheet_png(
    images: Sequence[np.ndarray | str | Path],
    captions: Sequence[str],
    path: str | Path,
    ncols: int = 4,
    title: str = "",
) -> Path:
    """A captioned grid of images (HxWx3 arrays, 0-255 or 0-1, or file paths), e.g. Grad-CAM overlays."""
    return _grid_png(images, captions, path, ncols, title=title)


def _spread(n: int, k: int) -> list[int]:
    """All of range(n) if n <= k, else k indices evenly spaced from the first to the last."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def prediction_grid_png(
    images: Sequence[np.ndarray | str | Path],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    confidence: Sequence[float],
    path: str | Path,
    ncols: int = 5,
    max_images: int = 20,
    title: str = "Predictions",
) -> Path:
    """Images titled "true: Pre / pred: Pre (97%)", green when right and red (bold) when wrong.

    With more than `max_images` images, an evenly spaced sample is drawn, so a list sorted by class
    still shows every class.
    """
    n = len(images)
    if not n == len(y_true) == len(y_pred) == len(confidence):
        raise ValueError(
            f"images, y_true, y_pred and confidence must have one entry per image; got lengths "
            f"{n}, {len(y_true)}, {len(y_pred)}, {len(confidence)}"
        )
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    keep = _spread(n, max_images)
    captions, colours = [], []
    for i in keep:
        true, pred = _class_name(y_true[i], "true"), _class_name(y_pred[i], "predicted")
        captions.append(f"true: {true} / pred: {pred} ({float(confidence[i]):.0%})")
        colours.append(RIGHT if true == pred else WRONG)
    right = colours.count(RIGHT)
    heading = f"{title}: {right}/{len(colours)} correct" + (
        f" (sample of {n})" if n > len(keep) else ""
    )
    return _grid_png(
        [images[i] for i in keep], captions, path, ncols, title=heading, colours=colours
    )


# --- reliability ------------------------------------------------------------------------------------


def reliability_diagram_png(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    title: str = "Reliability of the top-class probability",
) -> Path:
    """Accuracy against mean confidence per confidence bin (`calibration.reliability`), one curve
    per (probabilities, labels) pair of `curves` (e.g. held-out before and after temperature
    scaling, the test split after), each labelled with its images and ECE; marker area grows with
    a bin's images. The diagonal is a perfectly calibrated model: below it, over-confident."""
    from leukemia.calibration import expected_calibration_error, reliability

    if not curves:
        raise ValueError("no curves to draw: give at least one (probabilities, labels) pair")
    fig = _figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1.2, label="perfect calibration")
    for label, (probs, y) in curves.items():
        bins = reliability(probs, y)
        ece = expected_calibration_error(probs, y)
        (line,) = ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="",
            linewidth=1.5,
            label=f"{label} (n={len(y)}, ECE {ece:.3f})",
        )
        ax.scatter(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            s=[12 + 60 * math.sqrt(b["images"] / max(len(y), 1)) for b in bins],
            color=line.get_color(),
            zorder=3,
        )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Mean confidence (top-class probability) in the bin")
    ax.set_ylabel("Accuracy in the bin")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


# --- grid comparison --------------------------------------------------------------------------------


def _batch_key(value: Any) -> tuple[float, str]:
    """Sort batch sizes numerically, anything non-numeric last."""
    try:
        return (float(value), str(value))
    except (TypeError, ValueError):
        return (math.inf, str(value))


def _metric(row: Mapping[str, Any], name: str) -> float | None:
    value = row.get(name)
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class _Grid:
    """What the comparison is drawn over: one row of panels per variant, one column per metric,
    groups of bars per batch size, one bar per optimizer in each group."""

    variants: list[str]
    optimizers: list[str]
    batches: list[Any]
    colours: dict[str, Any]
    bar_width: float

    @classmethod
    def of(cls, rows: Sequence[Mapping[str, Any]]) -> _Grid:
        from matplotlib import colormaps

        optimizers = sorted({str(r["optimizer"]) for r in rows})
        return cls(
            variants=list(dict.fromkeys(str(r.get("variant", "seed")) for r in rows)) or ["seed"],
            optimizers=optimizers,
            batches=sorted({r["batch_size"] for r in rows}, key=_batch_key),
            colours={o: colormaps["tab10"](i % 10) for i, o in enumerate(optimizers)},
            bar_width=0.8 / max(len(optimizers), 1),
        )

    def bar_x(self, optimizer_index: int, batch_index: int) -> float:
        return batch_index + (optimizer_index - (len(self.optimizers) - 1) / 2) * self.bar_width


def _check_comparison_rows(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> None:
    if not metrics:
        raise ValueError("metrics must name at least one metric to plot")
    for row in rows:
        if "optimizer" not in row or "batch_size" not in row:
            raise ValueError(f"each row needs 'optimizer' and 'batch_size' keys, got {sorted(row)}")


def _runs_of(
    rows: Sequence[Mapping[str, Any]], variant: str, optimizer: str, batch: Any
) -> list[Mapping[str, Any]]:
    """The rows of one (variant, optimizer, batch size) configuration (several when repeated)."""
    return [
        r
        for r in rows
        if str(r.get("variant", "seed")) == variant
        and str(r["optimizer"]) == optimizer
        and r["batch_size"] == batch
    ]


def _selected_star(ax: Axes, x: float, y: float) -> None:
    ax.plot(
        x,
        y,
        marker="*",
        color="gold",
        markeredgecolor="black",
        markersize=13,
        linestyle="none",
        zorder=5,
        clip_on=False,
    )


def _bar(
    ax: Axes, grid: _Grid, x: float, optimizer: str, values: list[float], selected: bool
) -> None:
    """One configuration's bar (the mean), its single runs as dots, a star when selected, and
    its value above."""
    import numpy as np

    mean = float(np.mean(values))
    ax.bar(
        x,
        mean,
        grid.bar_width * 0.95,
        color=grid.colours[optimizer],
        edgecolor="black" if selected else "none",
        linewidth=1.5 if selected else 0,
        hatch="//" if selected else None,
    )
    if len(values) > 1:
        ax.plot([x] * len(values), values, "o", color="black", markersize=2.5)
    if selected:  # the star sits on the bar, its value label above the star
        _selected_star(ax, x, max(values))
    ax.annotate(
        f"{mean:.2f}",
        (x, max(values)),
        xytext=(0, 8 if selected else 2),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=7,
        rotation=90 if len(grid.optimizers) > 2 else 0,
    )


def _panel(
    ax: Axes, grid: _Grid, rows: Sequence[Mapping[str, Any]], variant: str, metric: str
) -> bool:
    """The bars of one metric for one variant; returns whether a selected run was drawn."""
    drawn = selected_drawn = False
    for oi, optimizer in enumerate(grid.optimizers):
        for bi, batch in enumerate(grid.batches):
            group = _runs_of(rows, variant, optimizer, batch)
            values = [v for v in (_metric(r, metric) for r in group) if v is not None]
            if not values:
                continue
            selected = any(r.get("selected") is True for r in group)
            _bar(ax, grid, grid.bar_x(oi, bi), optimizer, values, selected)
            drawn, selected_drawn = True, selected_drawn or selected
    if not drawn:
        message = f"no {metric}" if rows else "no runs"
        ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks(range(len(grid.batches)), [str(b) for b in grid.batches])
    ax.set_xlim(-0.5, max(len(grid.batches), 1) - 0.5)
    ax.set_xlabel("batch size")
    ax.set_title(metric if len(grid.variants) == 1 else f"{metric} — {variant}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return selected_drawn


def _metric_limits(axes: Any, rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> None:
    """Scores in [0, 1] share a 0-1 axis with room above for stars and labels; others fit."""
    import numpy as np

    for mi, metric in enumerate(metrics):
        column = [v for r in rows if (v := _metric(r, metric)) is not None]
        if column and min(column) >= 0 and max(column) <= 1:
            axes[0, mi].set_ylim(0, 1.25)  # room for the star and the value labels
            axes[0, mi].set_yticks(np.linspace(0, 1, 6))
        elif column:
            axes[0, mi].set_ylim(min(0.0, min(column) * 1.15), max(0.0, max(column) * 1.15))


def _comparison_legend(fig: Figure, grid: _Grid, selected_drawn: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(color=grid.colours[o], label=o) for o in grid.optimizers]
    if selected_drawn:
        star = Line2D(
            [],
            [],
            marker="*",
            color="gold",
            markeredgecolor="black",
            markersize=12,
            linestyle="none",
            label="selected",
        )
        handles.append(star)
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=len(handles),
            fontsize=9,
            frameon=False,
        )


def comparison_png(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    metrics: Sequence[str] = ("val_f1_macro", "val_accuracy", "test_accuracy"),
    title: str = "Grid comparison",
) -> Path:
    """Grouped bars per optimizer over batch sizes, one subplot per metric, one row per variant.

    Repeated (variant, optimizer, batch size) rows are averaged, their single values drawn as dots.
    A row with `"selected": True` is hatched and starred.
    """
    _check_comparison_rows(rows, metrics)
    grid = _Grid.of(rows)
    panel_w = max(3.2, 0.9 + 0.26 * len(grid.batches) * max(len(grid.optimizers), 1))
    fig = _figure(panel_w * len(metrics), 2.9 * len(grid.variants) + 0.9)
    axes = fig.subplots(len(grid.variants), len(metrics), squeeze=False, sharey="col")
    selected_drawn = False
    for vi, variant in enumerate(grid.variants):
        for mi, metric in enumerate(metrics):
            selected_drawn |= _panel(axes[vi, mi], grid, rows, variant, metric)
    _metric_limits(axes, rows, metrics)
    _comparison_legend(fig, grid, selected_drawn)
    fig.suptitle(title)
    return _save(fig, path)
