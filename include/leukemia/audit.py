"""The shortcut audit of a trained model: does it read the scale-bar overlay or the slide background
instead of the white cells?

Three checks on a seeded sample of the project's split (at most `AuditConfig.images` test images,
and as many train images for the region classifiers), each with a limit in `config.RUN_DEFAULTS`
(`audit_*`); a check over its limit gives one warning line.

1. **Region classifiers** (the data, as the model sees it): a random forest on the pixels of one
   non-cell region only, fitted on the train sample and scored on the test sample, beside chance
   (the test sample's largest-class share). Regions: the overlay square (`model.overlay_start`;
   filled when the model masks it, as inside the model) and a square of the same size in the
   top-left corner (slide background: stain, illumination, camera).
2. **Patch swaps** (the model): the overlay square and, separately, a top-left background patch
   (`swap_box`) of a test image of another class are pasted onto each test image; the share of
   predictions that change, and that move to the donor's class. When the pasted pixels are ones the
   model never sees (the masked square), the swapped images equal the originals as the model sees
   them (checked pixel by pixel) and are not run again.
3. **Grad-CAM** (the model): the mean share of the heat inside the overlay square over the first
   `gradcam_images` test images of the sample (the square is 2 % of the image). It warns only for
   a model that does not mask the square: a masked model's heat there is the fill's edge.

The checks are pure functions of pixels and a model, with no storage (images are read with
`features.load_images`, local paths or `s3://` URIs); `audit_run`, the DAG's step, reads the run's
model from MLflow and logs the result to it (`tracking.log_audit`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES, RUN_DEFAULTS
from leukemia.model import OVERLAY_FILL, overlay_start

log = logging.getLogger(__name__)

#: Patch swaps: what is pasted from the donor image.
SWAPS = ("corner", "background")
#: Region classifiers: whose pixels they read.
REGIONS = ("overlay", "background")
#: Each region is averaged over blocks down to at most this many pixels a side before the forest.
REGION_GRID = 8
#: Test images whose Grad-CAM overlays go into the audit's picture.
PICTURE_IMAGES = 8
BATCH = 32


@dataclass(frozen=True)
class AuditConfig:
    """Sample sizes and limits of the shortcut audit (defaults: `config.RUN_DEFAULTS.audit_*`)."""

    images: int = RUN_DEFAULTS.audit_images
    gradcam_images: int = RUN_DEFAULTS.audit_gradcam_images
    region_margin: float = RUN_DEFAULTS.audit_region_margin
    max_flip_rate: float = RUN_DEFAULTS.audit_max_flip_rate
    max_overlay_heat: float = RUN_DEFAULTS.audit_max_overlay_heat
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 0 or self.gradcam_images < 0:
            raise ValueError(
                f"audit images must be >= 0 (0: no audit), got images={self.images}, "
                f"gradcam_images={self.gradcam_images}"
            )


@dataclass
class AuditResult:
    """What the audit measured (metric names without the `audit_` prefix they are logged with), the
    warning lines of the checks over their limits, and Grad-CAM overlays for a picture."""

    metrics: dict[str, float]
    warnings: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    overlays: list[Any] = field(default_factory=list, repr=False)
    captions: list[str] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """Small and JSON-able: the metrics, warnings and seconds."""
        return {
            "metrics": {k: round(v, 4) for k, v in self.metrics.items()},
            "warnings": list(self.warnings),
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=1, sort_keys=True)

    def to_markdown(self) -> str:
        """The audit as a short report: one table of numbers, then the warnings."""
        lines = ["# Shortcut audit", "", "| check | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in self.metrics.items()]
        lines += [f"| seconds: {k} | {v:.1f} |" for k, v in self.seconds.items()]
        lines.append("")
        lines += [f"- WARNING: {w}" for w in self.warnings] or ["No check exceeded its limit."]
        return "\n".join(lines) + "\n"


# --- where the overlay and the background are ----------------------------------------------------


def region_box(region: str, size: int) -> tuple[slice, slice]:
    """(rows, columns) of a region classifier's square: `overlay` (bottom-right) or `background`."""
    side = size - overlay_start(size)
    if region == "overlay":
        return slice(size - side, size), slice(size - side, size)
    if region == "background":
        return slice(0, side), slice(0, side)
    raise ValueError(f"unknown region {region!r}: choose one of {', '.join(REGIONS)}")


def swap_box(swap: str, size: int) -> tuple[slice, slice]:
    """(rows, columns) of a swapped patch: the overlay square itself (`corner`: every overlay style
    lies inside it), or a top-left patch as tall as the square and twice as wide (`background`,
    32 x 64 px at 224)."""
    side = size - overlay_start(size)
    if swap == "corner":
        return region_box("overlay", size)
    if swap == "background":
        return slice(0, side), slice(0, 2 * side)
    raise ValueError(f"unknown swap {swap!r}: choose one of {', '.join(SWAPS)}")


def as_model_sees(pixels: Any, mask_overlay: bool) -> Any:
    """Raw pixels (n, S, S, 3) with the overlay square filled as the model's first layers fill it."""
    import numpy as np

    out = np.array(pixels, dtype="float32", copy=True)
    if mask_overlay:
        start = overlay_start(out.shape[1])
        out[:, start:, start:] = np.asarray(OVERLAY_FILL, dtype="float32")
    return out


def paste(target: Any, donor: Any, box: tuple[slice, slice]) -> Any:
    """A copy of `target` (S, S, 3) with `box` taken from `donor`."""
    import numpy as np

    out = np.array(target, copy=True)
    out[box] = donor[box]
    return out


def swapped(pixels: Any, donors: Sequence[int], swap: str) -> Any:
    """Each image of `pixels` (n, S, S, 3) with `swap`'s patch from image `donors[i]`."""
    import numpy as np

    box = swap_box(swap, pixels.shape[1])
    return np.stack([paste(p, pixels[d], box) for p, d in zip(pixels, donors, strict=True)])


def pick_donors(labels: Sequence[int], seed: int = 0) -> Any:
    """For each image, the index of an image of another class (seeded; -1 when there is none)."""
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    donors = np.full(len(labels), -1, dtype="int64")
    for i, label in enumerate(labels):
        others = np.flatnonzero(labels != label)
        if len(others):
            donors[i] = int(rng.choice(others))
    return donors


def sample_rows(
    rows: Sequence[dict[str, str]], split: str, n: int, seed: int = 0
) -> list[dict[str, str]]:
    """At most `n` rows of `split`, drawn with `seed` from the rows sorted by sha256 (so the same
    split gives the same sample on any worker), kept in that order."""
    import numpy as np

    part = sorted((r for r in rows if r["split"] == split), key=lambda r: r["sha256"])
    if len(part) <= n:
        return part
    keep = np.sort(np.random.default_rng(seed).choice(len(part), size=n, replace=False))
    return [part[i] for i in keep]


# --- 1. region classifiers ---------------------------------------------------------------------


def region_features(pixels: Any, box: tuple[slice, slice]) -> Any:
    """The region's pixels averaged over blocks to at most REGION_GRID a side: (n, g * g * 3)."""
    import numpy as np

    patch = np.asarray(pixels, dtype="float32")[(slice(None), *box)]
    n, h, w, c = patch.shape
    step = max(1, -(-max(h, w) // REGION_GRID))
    gh, gw = -(-h // step), -(-w // step)
    padded = np.pad(patch, ((0, 0), (0, gh * step - h), (0, gw * step - w), (0, 0)), mode="edge")
    return padded.reshape(n, gh, step, gw, step, c).mean(axis=(2, 4)).reshape(n, -1)


def region_accuracy(x_train: Any, y_train: Any, x_test: Any, y_test: Any, seed: int = 0) -> float:
    """Test accuracy of a random forest (100 trees) fitted on one region's features."""
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    forest.fit(np.asarray(x_train), np.asarray(y_train))
    return float(np.mean(forest.predict(np.asarray(x_test)) == np.asarray(y_test)))


def chance_level(y_test: Sequence[int]) -> float:
    """The accuracy of always answering the test sample's most common class."""
    import numpy as np

    counts = np.bincount(np.asarray(y_test, dtype="int64"), minlength=len(CLASSES))
    return float(counts.max() / max(counts.sum(), 1))


def region_regions(pixels: Any, mask_overlay: bool) -> dict[str, Any]:
    """Region features of a batch of raw pixels, as the model sees them: {region: (n, f)}."""
    seen = as_model_sees(pixels, mask_overlay)
    size = seen.shape[1]
    return {region: region_features(seen, region_box(region, size)) for region in REGIONS}


def region_scores(
    train: dict[str, Any], y_train: Any, test: dict[str, Any], y_test: Any, seed: int = 0
) -> dict[str, float]:
    """Accuracy of each region's forest (train → test) and chance."""
    out = {"chance": chance_level(y_test)}
    for region in REGIONS:
        out[f"{region}_region_accuracy"] = region_accuracy(
            train[region], y_train, test[region], y_test, seed
        )
    return out


# --- 2. patch swaps ----------------------------------------------------------------------------


def flip_rates(before: Any, after: Any, donor_labels: Any) -> tuple[float, float]:
    """(share of predictions that changed, share that changed to the donor's class)."""
    import numpy as np

    before, after = np.asarray(before), np.asarray(after)
    changed = before != after
    return float(changed.mean()), float((changed & (after == np.asarray(donor_labels))).mean())


def swap_scores(
    predict: Callable[[Any], Any],
    pixels: Any,
    labels: Any,
    mask_overlay: bool,
    seed: int = 0,
    before: Any | None = None,
) -> dict[str, float]:
    """Flip rates of each patch swap; `predict` maps raw pixels to class indices, `before` the
    predictions of the unswapped images when they are known already."""
    import numpy as np

    labels = np.asarray(labels)
    donors = pick_donors(labels, seed)
    if not len(labels) or (donors < 0).any():  # a donor of another class needs two classes
        return {}
    before = predict(pixels) if before is None else np.asarray(before)
    seen = as_model_sees(pixels, mask_overlay)
    out: dict[str, float] = {"swap_images": float(len(labels))}
    for swap in SWAPS:
        changed = swapped(pixels, donors, swap)
        # the model cannot tell these apart from the originals: no need to run it again
        same = np.array_equal(as_model_sees(changed, mask_overlay), seen)
        after = before if same else predict(changed)
        out[f"{swap}_swap_changed"], out[f"{swap}_swap_to_donor"] = flip_rates(
            before, after, labels[donors]
        )
    return out


def model_predictor(model: Any) -> Callable[[Any], Any]:
    """Raw pixels → class indices with a pixels-to-softmax Keras model, a batch at a time."""
    import numpy as np

    def predict(pixels: Any) -> Any:
        if not len(pixels):
            return np.zeros(0, dtype="int64")
        return np.concatenate(
            [
                np.asarray(model.predict_on_batch(pixels[i : i + BATCH])).argmax(axis=1)
                for i in range(0, len(pixels), BATCH)
            ]
        )

    return predict


# --- 3. Grad-CAM ------------------------------------------------------------------------------


def overlay_heat_share(heatmaps: Any) -> float:
    """Mean share of each heatmap's total inside the overlay square (flat maps left out)."""
    import numpy as np

    heat = np.asarray(heatmaps, dtype="float64")
    start = overlay_start(heat.shape[1])
    total = heat.sum(axis=(1, 2))
    inside = heat[:, start:, start:].sum(axis=(1, 2))
    live = total > 0
    return float((inside[live] / total[live]).mean()) if live.any() else 0.0


# --- limits ------------------------------------------------------------------------------------


def shortcut_warnings(metrics: dict[str, float], settings: AuditConfig) -> list[str]:
    """One line per check over its limit."""
    lines = []
    chance = metrics.get("chance")
    for region, what in (("overlay", "the overlay square"), ("background", "a background square")):
        accuracy = metrics.get(f"{region}_region_accuracy")
        if (
            accuracy is not None
            and chance is not None
            and accuracy > chance + settings.region_margin
        ):
            lines.append(
                f"{region} region: a random forest on the pixels of {what} alone reaches "
                f"{accuracy:.2f} test accuracy (chance {chance:.2f}, limit chance + "
                f"{settings.region_margin:.2f})"
            )
    for swap in SWAPS:
        changed = metrics.get(f"{swap}_swap_changed")
        if changed is not None and changed > settings.max_flip_rate:
            lines.append(
                f"{swap} swap: pasting the {swap} patch of another class's image changes "
                f"{changed:.1%} of test predictions ({metrics[f'{swap}_swap_to_donor']:.1%} to the "
                f"donor's class; limit {settings.max_flip_rate:.1%})"
            )
    heat = metrics.get("overlay_heat_share")
    # a model that fills the square reads nothing there (its swap is pixel-identical); heat there is
    # the fill's edge (measured on the real images: 5-7 % masked, 3 % unmasked), not a shortcut
    if heat is not None and heat > settings.max_overlay_heat and not metrics.get("overlay_masked"):
        lines.append(
            f"Grad-CAM: {heat:.1%} of the heat lies in the overlay square "
            f"({metrics['overlay_area_share']:.1%} of the image; limit "
            f"{settings.max_overlay_heat:.1%})"
        )
    return lines


def masks_overlay(model: Any) -> bool:
    """True when the model (or a model nested in it) fills the overlay square (`overlay_fill`)."""
    for layer in model.layers:
        if layer.name == "overlay_fill" or (hasattr(layer, "layers") and masks_overlay(layer)):
            return True
    return False


# --- the audit --------------------------------------------------------------------------------


def audit_model(
    model: Any,
    rows: Sequence[dict[str, str]],
    images: str | Path,
    mask_overlay: bool,
    settings: AuditConfig | None = None,
) -> AuditResult:
    """Run the three checks for one pixels-to-softmax model (`model.assemble`); see the module
    docstring. `rows` is the split, `images` the folder or `s3://` prefix their paths are under."""
    import numpy as np

    from leukemia.features import iter_image_batches, labels_to_index, load_images
    from leukemia.gradcam import GradCam, caption, overlay
    from leukemia.objectstore import join

    settings = settings or AuditConfig()
    size = int(model.input_shape[1])
    train = sample_rows(rows, "train", settings.images, settings.seed)
    test = sample_rows(rows, "test", settings.images, settings.seed)
    metrics: dict[str, float] = {"train_images": float(len(train)), "test_images": float(len(test))}
    seconds: dict[str, float] = {}

    started = time.monotonic()
    pixels = load_images([join(images, r["path"]) for r in test], size)
    labels = labels_to_index([r["label"] for r in test])
    parts: dict[str, list[Any]] = {region: [] for region in REGIONS}
    for batch in iter_image_batches([join(images, r["path"]) for r in train], size, 64):
        for region, feats in region_regions(batch, mask_overlay).items():
            parts[region].append(feats)
    if train and test:
        x_train = {region: np.concatenate(parts[region]) for region in REGIONS}
        y_train = labels_to_index([r["label"] for r in train])
        metrics.update(
            region_scores(
                x_train, y_train, region_regions(pixels, mask_overlay), labels, settings.seed
            )
        )
    seconds["regions"] = time.monotonic() - started

    started = time.monotonic()
    metrics.update(swap_scores(model_predictor(model), pixels, labels, mask_overlay, settings.seed))
    seconds["swaps"] = time.monotonic() - started

    started = time.monotonic()
    overlays, captions = [], []
    explained = pixels[: settings.gradcam_images]
    if len(explained):
        cam = GradCam(model)
        heat = []
        for i in range(0, len(explained), 8):
            h, probs = cam(explained[i : i + 8])
            heat.append(h)
            for image, hm, p in zip(explained[i : i + 8], h, probs, strict=True):
                if len(overlays) < PICTURE_IMAGES:
                    overlays.append(overlay(image, hm))
                    captions.append(f"{test[len(overlays) - 1]['label']} · {caption(p)}")
        metrics["overlay_heat_share"] = overlay_heat_share(np.concatenate(heat))
        metrics["gradcam_images"] = float(len(explained))
    metrics["overlay_area_share"] = (size - overlay_start(size)) ** 2 / size**2
    metrics["overlay_masked"] = float(mask_overlay)
    seconds["gradcam"] = time.monotonic() - started

    result = AuditResult(metrics, shortcut_warnings(metrics, settings), seconds, overlays, captions)
    log.info(
        "Shortcut audit: %s (%.0f s)%s",
        ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
        sum(seconds.values()),
        "".join(f"\nWARNING: {w}" for w in result.warnings),
    )
    return result


def audit_run(
    run_id: str,
    split_path: str | Path,
    images_uri: str | Path,
    images: int = RUN_DEFAULTS.audit_images,
) -> dict[str, Any] | None:
    """Audit the pixels-to-softmax model of a run (the one it logged, e.g. fine-tuned, else built as
    `tracking.log_full_model` builds it) on at most `images` test (and train) images of the split
    read from `images_uri`, and log the result to the run (`tracking.log_audit`: `audit_*`
    metrics, `audit/` artifacts, the `shortcut_warnings` tag that registration copies to the
    version). Returns the small summary; None when `images` is 0 (no audit). A run audited before
    (a retried task) returns what was logged, without auditing again."""
    from leukemia import tracking
    from leukemia.dataset import read_split
    from leukemia.registry import ModelRef, load_keras

    if images <= 0:
        log.info("audit_images is 0: the candidate is not audited for shortcuts")
        return None
    tracking.setup()
    run = tracking.get_run(run_id)
    if tracking.SHORTCUT_TAG in run.data.tags:
        log.info("Run %s was audited by an earlier attempt", run_id)
        warnings = run.data.tags[tracking.SHORTCUT_TAG]
        metrics = {
            k.removeprefix("audit_"): round(v, 4)
            for k, v in run.data.metrics.items()
            if k.startswith("audit_")
        }
        return {"metrics": metrics, "warnings": warnings.splitlines() if warnings else []}
    logged = run.data.tags.get("model_uri")
    model = load_keras(ModelRef(logged, logged)) if logged else tracking.full_model_of(run)
    result = audit_model(
        model,
        read_split(split_path),
        images_uri,
        masks_overlay(model),
        AuditConfig(images=images),
    )
    tracking.log_audit(run_id, result)
    return result.summary()
