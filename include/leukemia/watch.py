"""The drift watch of scoring: the reference a registered version keeps, per-image out-of-distribution
reasons, and each scoring run's batch decision (the statistics are `drift.py`'s).

**At registration** (`promotion.register_and_gate` → `store_reference`) the run's training features
are read from the feature cache it trained on (run tags `features_uri`, `trained_on`, `split_uri`)
and summarised as a `drift.Reference`: a seeded sample of `LEUKEMIA_DRIFT_REFERENCE_SAMPLE` vectors
(float16) and the OOD score's model with its threshold at `LEUKEMIA_OOD_FPR`. Beside it goes a
*background* reference: the shortcut audit's background-region features (`audit.region_features`
of the top-left square: slide background, stain, illumination, camera) of a sample of the training
images. Both are logged to the run as `drift/reference.npz` and `drift/background.npz`, and the
version is tagged `drift_reference` (their folder) and `drift_reference_bytes` (their size). A
version without the tag (registered before, an ensemble of several feature variants, a fine-tuned
trunk whose features are not the cached ones) is scored without a drift decision (one warning).

**At scoring** (`predict.load_model` → `load_references`) each image's pooled features come out of
the same forward pass as its probabilities (`features_model`); an image whose OOD score passes the
threshold is referred with the reason (`ood_reason`). `Watch` keeps a seeded sample of at most
`LEUKEMIA_DRIFT_MAX_IMAGES` of the run's feature vectors (and their background features) and, at the
end, runs the two-sample test against the reference with the batch's predicted class mix
(`drift.batch_drift`; below `LEUKEMIA_DRIFT_MIN_BATCH` images: no decision, said so). A drifted
batch refers every image (`DriftReport.reason`) and is tested once more on the background features:
one line says whether the slide background moved too (acquisition: stain, light, camera). Its
features are colour averages of a near-white corner, so a blur or a mild stain change leaves it
unchanged (bench/drift.py: moved in every brightness and strong-stain batch, 4 of 18 one-lab stain
batches, no blurred one): "unchanged" says "not a colour or lighting change", not "the cells".
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leukemia.config import env
from leukemia.drift import DriftResult, Reference

log = logging.getLogger(__name__)

#: The run's artifact folder of the references, and their files.
REFERENCE_FOLDER = "drift"
REFERENCE_FILE = "reference.npz"
BACKGROUND_FILE = "background.npz"
#: Version tags: the references' folder (`runs:/<run>/drift`) and their size in bytes.
REFERENCE_TAG = "drift_reference"
REFERENCE_BYTES_TAG = "drift_reference_bytes"
#: Run tags that say which cached features trained the run's head.
FEATURES_TAG = "features_uri"
TRAINED_ON_TAG = "trained_on"
#: The batch decision when the version keeps no reference.
NO_REFERENCE = "no reference: no drift decision"


@dataclass(frozen=True)
class WatchSettings:
    """The deployment's drift settings (environment, `config.ENV_DEFAULTS`)."""

    sample: int  # LEUKEMIA_DRIFT_REFERENCE_SAMPLE
    ood_fpr: float  # LEUKEMIA_OOD_FPR
    min_batch: int  # LEUKEMIA_DRIFT_MIN_BATCH
    alpha: float  # LEUKEMIA_DRIFT_ALPHA
    max_images: int  # LEUKEMIA_DRIFT_MAX_IMAGES

    @classmethod
    def from_env(cls) -> WatchSettings:
        values = cls(
            sample=int(env("LEUKEMIA_DRIFT_REFERENCE_SAMPLE")),
            ood_fpr=float(env("LEUKEMIA_OOD_FPR")),
            min_batch=int(env("LEUKEMIA_DRIFT_MIN_BATCH")),
            alpha=float(env("LEUKEMIA_DRIFT_ALPHA")),
            max_images=int(env("LEUKEMIA_DRIFT_MAX_IMAGES")),
        )
        ok = values.sample >= 10 and 0 < values.ood_fpr < 1 and 0 < values.alpha < 1
        if not ok or values.min_batch < 2 or values.max_images < values.min_batch:
            raise ValueError(
                f"drift settings out of range: {values}; LEUKEMIA_DRIFT_REFERENCE_SAMPLE ≥ 10, "
                "LEUKEMIA_OOD_FPR and LEUKEMIA_DRIFT_ALPHA in (0, 1), LEUKEMIA_DRIFT_MIN_BATCH ≥ 2 "
                "and LEUKEMIA_DRIFT_MAX_IMAGES ≥ it"
            )
        return values


# --- at registration -----------------------------------------------------------------------------


def training_run_tags(features_uri: str | Path, splits: str) -> dict[str, str]:
    """The tags a training or refit run sets so that registration can fit its reference."""
    return {FEATURES_TAG: str(features_uri), TRAINED_ON_TAG: splits}


def fit_references(
    run: Any, images_dir: str | Path, settings: WatchSettings | None = None
) -> tuple[Reference, Reference | None] | None:
    """The feature and background references of a run's training images; None (with the reason
    logged) when the run does not say which cached features trained it."""
    import json

    import numpy as np

    from leukemia.audit import sample_rows
    from leukemia.dataset import read_split
    from leukemia.training import TrainConfig, split_arrays

    settings = settings or WatchSettings.from_env()
    tags = run.data.tags
    if FEATURES_TAG not in tags or "split_uri" not in tags:
        log.warning(
            "Run %s does not name the cached features its head was trained on (an ensemble, a "
            "fine-tuned trunk, or a run from before the drift watch): no drift reference; its "
            "scoring gives no drift decision",
            run.info.run_id,
        )
        return None
    cfg = TrainConfig.from_dict(json.loads(tags["config"]))
    rows = read_split(tags["split_uri"])
    data = split_arrays(rows, tags[FEATURES_TAG], cfg.model.variant)
    parts = tags.get(TRAINED_ON_TAG, "train").split("+")
    x = np.concatenate([data[p][0] for p in parts])
    y = np.concatenate([data[p][1] for p in parts])
    reference = Reference.fit(x, y, sample=settings.sample, fpr=settings.ood_fpr)
    chosen = sample_rows(rows, "train", settings.sample)
    background = background_reference(chosen, images_dir, cfg.model.input_size, settings)
    return reference, background


def background_reference(
    rows: list[dict[str, str]], images_dir: str | Path, size: int, settings: WatchSettings
) -> Reference | None:
    """The background-region features of `rows`' images as a reference (None below 10 images)."""
    import numpy as np

    from leukemia.features import iter_image_batches, labels_to_index
    from leukemia.objectstore import join

    if len(rows) < 10:
        return None
    paths = [join(images_dir, r["path"]) for r in rows]
    feats = np.concatenate([background_features(b) for b in iter_image_batches(paths, size, 64)])
    labels = labels_to_index([r["label"] for r in rows])
    return Reference.fit(feats, labels, sample=settings.sample, fpr=settings.ood_fpr)


def background_features(pixels: Any) -> Any:
    """The shortcut audit's background-region features of a batch of pixels (n, S, S, 3)."""
    from leukemia.audit import region_box, region_features

    return region_features(pixels, region_box("background", int(pixels.shape[1])))


def store_reference(run_id: str, images_dir: str | Path) -> dict[str, str]:
    """Fit and log a run's references (`drift/`); the version tags that point at them ({} when the
    run has none). A retry reuses the references an earlier attempt logged."""
    import mlflow

    client = mlflow.MlflowClient()
    logged = client.list_artifacts(run_id, REFERENCE_FOLDER)
    if f"{REFERENCE_FOLDER}/{REFERENCE_FILE}" in {a.path for a in logged}:
        size = sum(a.file_size or 0 for a in logged)
        return {REFERENCE_TAG: f"runs:/{run_id}/{REFERENCE_FOLDER}", REFERENCE_BYTES_TAG: str(size)}
    fitted = fit_references(client.get_run(run_id), images_dir)
    return log_references(run_id, *fitted) if fitted is not None else {}


def log_references(
    run_id: str, reference: Reference, background: Reference | None
) -> dict[str, str]:
    """Log the references to the run (`drift/reference.npz`, `drift/background.npz`); the version
    tags that point at them."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="leukemia-drift-") as tmp:
        size = reference.save(Path(tmp) / REFERENCE_FILE)
        if background is not None:
            size += background.save(Path(tmp) / BACKGROUND_FILE)
        mlflow.MlflowClient().log_artifacts(run_id, tmp, artifact_path=REFERENCE_FOLDER)
    log.info(
        "Drift reference of run %s: %d of %d training feature vectors (width %d), OOD threshold "
        "%.2f at fpr %g%s; %s background; %d bytes",
        run_id,
        len(reference.sample),
        reference.n_train,
        reference.width,
        reference.threshold,
        reference.fpr,
        " (too few images to place it: no image flagged)" if reference.ood_limited else "",
        f"{len(background.sample)} images'" if background is not None else "no",
        size,
    )
    return {REFERENCE_TAG: f"runs:/{run_id}/{REFERENCE_FOLDER}", REFERENCE_BYTES_TAG: str(size)}


# --- at scoring ----------------------------------------------------------------------------------


def load_references(version_tags: dict[str, str]) -> tuple[Reference | None, Reference | None]:
    """The (features, background) references a registered version keeps; (None, None) without."""
    import mlflow

    folder = version_tags.get(REFERENCE_TAG, "")
    if not folder:
        return None, None
    with tempfile.TemporaryDirectory(prefix="leukemia-drift-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=folder, dst_path=tmp))
        reference = Reference.load(local / REFERENCE_FILE)
        background = local / BACKGROUND_FILE
        return reference, Reference.load(background) if background.is_file() else None


def features_model(model: Any, width: int) -> Any | None:
    """The model's own layers rewired with two outputs, the pooled features of width `width` its
    head takes and its probabilities (one forward pass); None unless the model is one
    preprocess → trunk → pool → head chain (`model.assemble`) with a pooling of that width."""
    import keras

    parts = {layer.name: layer for layer in model.layers}
    pools = [p for name, p in parts.items() if name.startswith("pool_")]
    chain = all(name in parts for name in ("preprocess", "vgg16_trunk", "head"))
    if not chain or len(pools) != 1 or int(pools[0].output.shape[-1]) != width:
        return None
    inputs = keras.Input(tuple(model.input_shape[1:]), name="pixels")
    pooled = parts["vgg16_trunk"](parts["preprocess"](inputs), training=False)
    features = keras.tree.flatten(pools[0](pooled))[0]
    probabilities = keras.tree.flatten(parts["head"](features, training=False))[0]
    return keras.Model(inputs, [features, probabilities], name="with_features")


def ood_reason(score: float, threshold: float) -> str:
    """The referral reason of an image over the OOD threshold."""
    return f"unlike the training images (OOD score {score:.1f} > {threshold:.1f})"


@dataclass
class DriftReport:
    """A scoring run's drift decision (features) and its background line."""

    result: DriftResult | None
    background: DriftResult | None = None
    ood_flagged: int = 0

    @property
    def decision(self) -> str:
        return self.result.decision if self.result is not None else NO_REFERENCE

    @property
    def drifted(self) -> bool:
        return self.result is not None and self.result.drifted

    @property
    def reason(self) -> str:
        """The referral reason every image of a drifted batch gets ("" when it did not drift)."""
        if not self.drifted or self.result is None:
            return ""
        return f"batch drifted (AUC {self.result.statistic:.2f}, p {self.result.p_value:.4f})"

    def background_line(self) -> str:
        """Where the shift is: the background test's verdict on a drifted batch."""
        if not self.drifted:
            return ""
        if self.background is None:
            return "background: not checked (the version keeps no background reference)"
        b = self.background
        if b.statistic is None:
            return f"background: {b.decision}"
        where = (
            "shifted too: acquisition (stain, illumination, camera) rather than the cells"
            if b.drifted
            else "unchanged: no colour or lighting change of the slide (look at the cells and "
            "the focus)"
        )
        return f"background: {where} (AUC {b.statistic:.2f}, p {b.p_value:.4f})"

    def line(self) -> str:
        """One line for the run's log, the ledger and the scoring output."""
        head = self.result.summary() if self.result is not None else f"drift watch: {NO_REFERENCE}"
        flagged = (
            f"{self.ood_flagged} image{'' if self.ood_flagged == 1 else 's'} out of distribution"
        )
        parts = [head, flagged, self.background_line()]
        return "; ".join(p for p in parts if p)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (XCom, the ledger, the JSON report)."""
        return {
            "decision": self.decision,
            "drifted": self.drifted,
            "line": self.line(),
            "ood_flagged": self.ood_flagged,
            "test": self.result.as_dict() if self.result is not None else None,
            "background": self.background.as_dict() if self.background is not None else None,
        }


@dataclass
class Watch:
    """One scoring run's drift watch: a seeded reservoir sample of its feature vectors (and their
    background features and predicted classes), tested against the reference at the end."""

    reference: Reference | None
    background: Reference | None = None
    settings: WatchSettings = field(default_factory=WatchSettings.from_env)
    seed: int = 0
    seen: int = 0
    ood_flagged: int = 0
    _rows: list[tuple[Any, Any, int]] = field(default_factory=list)

    def observe(self, features: Any, pixels: Any, classes: list[int], flagged: int = 0) -> None:
        """Add one batch (reservoir sampling keeps at most `settings.max_images` of the run)."""
        import numpy as np

        if self.reference is None or len(classes) == 0:
            return
        self.ood_flagged += flagged
        backgrounds = background_features(pixels) if self.background is not None else None
        rng = np.random.default_rng([self.seed, self.seen])
        for i, k in enumerate(classes):
            row = (
                np.asarray(features[i], "float32"),
                backgrounds[i] if backgrounds is not None else None,
                k,
            )
            self.seen += 1
            if len(self._rows) < self.settings.max_images:
                self._rows.append(row)
            else:
                slot = int(rng.integers(self.seen))
                if slot < self.settings.max_images:
                    self._rows[slot] = row

    def decide(self) -> DriftReport:
        """The batch test (and, when it drifted, the background test) on the sampled images."""
        import numpy as np

        from leukemia.drift import batch_drift

        if self.reference is None:
            return DriftReport(None)
        s = self.settings
        if len(self._rows) < s.min_batch:
            return DriftReport(
                DriftResult(
                    None, None, f"too few images (n < {s.min_batch}): no decision", self.seen
                ),
                ood_flagged=self.ood_flagged,
            )
        x = np.stack([r[0] for r in self._rows])
        classes = np.asarray([r[2] for r in self._rows])
        test = dict(classes=classes, min_batch=s.min_batch, alpha=s.alpha)
        report = DriftReport(batch_drift(self.reference, x, **test), ood_flagged=self.ood_flagged)
        if report.drifted and self.background is not None:
            b = np.stack([r[1] for r in self._rows])
            report.background = batch_drift(self.background, b, **test)
        return report
