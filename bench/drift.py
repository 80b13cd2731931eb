"""The drift watch on the real images: false alarms, detection of shifted batches, and its cost.

A `leukemia.drift.Reference` is fitted on the train split's cached features (the project split,
seed 0; 224 px, masked, the offline VGG16 weights, the cache `bench/quality.py` fills) and every
batch of `--batch` images is judged against it (`batch_drift`: ridge two-sample test, permutation
p-value; `ood_flags`: per-image PPCA distance):

    none (test split)     `--null-batches` random batches of the test split: the false alarms
    single class <C>      batches of test images of one class only (a class prior shift)
    stain jitter          test images with HED stain jitter of sigma/shift `--stain` per image
                          (the training augmentation's are 0.05 / 0.005: `augment.AugmentConfig`)
    stain (one lab)       test images with one fixed stain change for all: haematoxylin ×1.15,
                          eosin ×0.85 (another laboratory's protocol)
    brightness            test images darkened by PIL's Brightness `--brightness` (training: ±10 %)
    blur                  test images with PIL's GaussianBlur of radius `--blur` px (focus)
    synthetic             the synthetic generator's 224 px smears (`leukemia.dev.synthetic`)
    float32 features      unshifted test images extracted in float32 against a bfloat16 reference
                          (only when the cache is bfloat16): what the scoring pass would see if it
                          computed its features at another precision than the training cache

The shifted images (`--pool` per shift, a seeded sample of the test split) are extracted once with
the cache's trunk and precision (`features.build_extractor`) and kept under bench/out/drift/; their
batches are `--shift-batches` seeded subsets of the pool. Prints per shift: batches, the share
flagged as drift (the false-alarm rate for the unshifted rows, else the detection rate) with its
mean AUC and median p-value; the same with the reference side matched to the batch's predicted
class mix (`batch_drift(classes=...)`; a logistic regression on the train features stands in for
the champion's predictions); the share of its images over the OOD threshold; and a standardised
logistic regression's cross-validated AUC on the first `--compare` batches of the none, stain and
blur rows (the classic two-sample
classifier the ridge one replaces). Then the watch's seconds per scored image (drift test + OOD
scores) against the extraction's (the "extra cost ≤ 10 % of scoring"; the trunk is nearly all of
scoring).

The background line (`watch.DriftReport.background_line`): a background reference is fitted as
registration fits it (`watch.background_reference` on `audit.sample_rows(rows, "train", 500)` of
the project split, the images read from `--data`), each pool keeps the background-region features
of its shifted pixels (`watch.background_features`, the same pass as its features), and every
batch the class-matched test flags is tested once more on its background features, class-matched
with the same predicted classes (as `watch.Watch.decide`): "background moved (of flagged)" is the
share of flagged batches whose background drifted too (acquisition rather than the cells; "-":
none flagged). The first batch of each shift prints its `DriftReport(...).line()`.

    nice -n 10 python bench/drift.py [--batch 50] [--pool 120] [--null-batches 40]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OUT,
    logistic,
    machine,
    parse_real_data_args,
    real_data_parser,
    table,
)

WORK = OUT / "drift"
#: Part of the pools' cache key: bump when what a pool file holds changes (2: background features).
POOLS_FORMAT = 2
#: Shifts on which a logistic regression's AUC is computed too (one 5-fold CV takes ~10 s).
COMPARED = ("none (test split)", "stain jitter", "stain (one lab)", "blur")
LAB_STAIN = (1.15, 0.85, 1.0)  # haematoxylin, eosin, DAB density scales of "another laboratory"


def stain_scale(image: Any, scales: tuple[float, float, float]) -> Any:
    """One fixed HED density scaling (`augment.hed_jitter` with fixed factors and no shift)."""
    import numpy as np
    from skimage.color import hed_from_rgb, rgb_from_hed

    log_adjust = np.log(1e-6)
    density = np.log(np.clip(np.asarray(image, dtype="float64"), 1e-6, 255) / 255.0) / log_adjust
    rgb = np.exp(((density @ hed_from_rgb) * np.asarray(scales)) @ rgb_from_hed * log_adjust)
    return np.clip(rgb, 0, 1) * 255.0


def shift_pixels(name: str, pixels: Any, args: Any, seed: int) -> Any:
    """The shifted copy of a batch of test images (n, 224, 224, 3), pixels 0-255."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter

    from leukemia.augment import hed_jitter

    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):
        rng = np.random.default_rng([seed, i])
        if name == "stain jitter":
            out[i] = hed_jitter(image, rng, args.stain[0], args.stain[1])
        elif name == "stain (one lab)":
            out[i] = stain_scale(image, LAB_STAIN)
        else:
            pil = Image.fromarray(np.clip(np.rint(image), 0, 255).astype("uint8"))
            if name == "brightness":
                pil = ImageEnhance.Brightness(pil).enhance(args.brightness)
            elif name == "blur":
                pil = pil.filter(ImageFilter.GaussianBlur(args.blur))
            out[i] = np.asarray(pil, dtype="float32")
    return out


def extract(extractor: Any, pixels: Any, variant: str) -> tuple[Any, float]:
    """Features of the variant and the extraction's seconds per image."""
    import numpy as np

    from leukemia.features import select_variant

    started = time.perf_counter()
    rows = [
        np.asarray(extractor.predict_on_batch(pixels[i : i + 32]), dtype="float32")
        for i in range(0, len(pixels), 32)
    ]
    seconds = (time.perf_counter() - started) / max(len(pixels), 1)
    return select_variant(np.concatenate(rows), variant), seconds


def backgrounds(paths: list[Path]) -> Any:
    """The background-region features (`watch.background_features`) of images read at 224 px."""
    import numpy as np

    from leukemia.features import iter_image_batches
    from leukemia.watch import background_features

    return np.concatenate([background_features(b) for b in iter_image_batches(paths, 224, 64)])


def shifted_pools(
    args: Any, test_paths: list[Path], precision: str
) -> dict[str, tuple[Any, Any, float]]:
    """name → (features, background features, extraction s/image) of each shifted pool; extracted
    once, then kept."""
    import hashlib
    import tempfile

    import numpy as np

    from leukemia.dev.synthetic import generate
    from leukemia.features import build_extractor, load_images
    from leukemia.model import ModelConfig
    from leukemia.watch import background_features

    names = ["stain jitter", "stain (one lab)", "brightness", "blur", "synthetic"]
    if precision != "float32":
        names.append("float32 features")
    key = f"{args.variant}-{precision}-{args.pool}-{args.stain}-{args.brightness}-{args.blur}"
    key = f"v{POOLS_FORMAT}-{key}"
    path = WORK / f"pools-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if path.exists() and not args.fresh:
        with np.load(path) as data:
            return {n: (data[n], data[n + " background"], float(data[n + " s"])) for n in names}
    cfg = ModelConfig(input_size=224, weights=str(args.weights))
    rng = np.random.default_rng(args.seed)
    paths = [test_paths[i] for i in rng.permutation(len(test_paths))[: args.pool]]
    pixels = load_images(paths, 224)
    extractors = {precision: build_extractor(cfg, precision)}
    extractors[precision].predict_on_batch(pixels[:2])  # warm-up: the rate is the extraction's
    pools: dict[str, tuple[Any, Any, float]] = {}
    for name in names:
        if name == "synthetic":
            with tempfile.TemporaryDirectory() as tmp:
                made = generate(tmp, max(1, args.pool // 4), size=224, seed=args.seed)
                batch = load_images(made, 224)
        elif name == "float32 features":
            extractors["float32"] = build_extractor(cfg, "float32")
            extractors["float32"].predict_on_batch(pixels[:2])
            batch = pixels
        else:
            batch = shift_pixels(name, pixels, args, args.seed)
        extractor = extractors["float32" if name == "float32 features" else precision]
        features, seconds = extract(extractor, batch, args.variant)
        pools[name] = (features, background_features(batch), seconds)
        print(f"  extracted {name}: {len(batch)} images, {seconds:.3f} s/image", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    arrays = {n: f for n, (f, _, _) in pools.items()}
    arrays |= {n + " background": b for n, (_, b, _) in pools.items()}
    np.savez(path, **arrays, **{n + " s": np.float64(s) for n, (_, _, s) in pools.items()})
    return pools


def logistic_auc(reference: Any, batch: Any, ratio: float, seed: int) -> tuple[float, float]:
    """A standardised logistic regression's 5-fold out-of-fold AUC (reference sample vs batch) and
    its seconds: the classic classifier two-sample test's statistic, without permutations."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    m = min(len(reference.sample), round(ratio * len(batch)))
    ref = np.asarray(reference.sample, dtype="float64")[rng.permutation(len(reference.sample))[:m]]
    x = (np.vstack([ref, batch]) - reference.mean) / reference.scale
    y = np.r_[np.zeros(m), np.ones(len(batch))]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    scores = cross_val_predict(
        LogisticRegression(C=0.5, max_iter=2000), x, y, cv=folds, method="decision_function"
    )
    return float(roc_auc_score(y, scores)), time.perf_counter() - started


def judge(
    references: tuple[Any, Any],
    pool: tuple[Any, Any],
    classes: Any,
    batches: int,
    compare: int,
    args: Any,
) -> tuple[dict[str, Any], str]:
    """Run the watch on `batches` seeded batches of `args.batch` rows of `pool` (features,
    background features) against `references` (the same two): unmatched, and with the reference
    side matched to the batch's predicted `classes`, then the background test on the batches that
    drifted (as `watch.Watch.decide`); the first `compare` also with a logistic regression. The
    table row and the first batch's `DriftReport` line."""
    import numpy as np

    from leukemia.drift import REFERENCE_RATIO, batch_drift, ood_flags
    from leukemia.watch import DriftReport, WatchSettings

    reference, background = references
    features, bg = pool
    s = WatchSettings.from_env()
    rng = np.random.default_rng(args.seed + len(features))
    plain, matched, moved, lr, example = [], [], [], [], ""
    for b in range(batches):
        rows = np.sort(rng.permutation(len(features))[: args.batch])
        test: dict[str, Any] = dict(
            classes=classes[rows], min_batch=s.min_batch, alpha=s.alpha, seed=b
        )
        plain.append(batch_drift(reference, features[rows], seed=b))
        matched.append(batch_drift(reference, features[rows], **test))
        report = DriftReport(matched[-1])
        if report.drifted:
            report.background = batch_drift(background, bg[rows], **test)
            moved.append(report.background.drifted)
        if b == 0:
            report.ood_flagged = int(ood_flags(reference, features[rows]).sum())
            example = report.line()
        if b < compare:
            lr.append(logistic_auc(reference, features[rows], REFERENCE_RATIO, b)[0])
    row = {
        "batches": batches,
        "flagged": float(np.mean([r.drifted for r in plain])),
        "mean AUC": float(np.mean([r.statistic for r in plain])),
        "median p": float(np.median([r.p_value for r in plain])),
        "flagged, class-matched": float(np.mean([r.drifted for r in matched])),
        "mean AUC, class-matched": float(np.mean([r.statistic for r in matched])),
        "OOD-flag rate": float(ood_flags(reference, features).mean()),
        "background moved (of flagged)": float(np.mean(moved)) if moved else "-",
        f"logistic AUC ({args.compare} batches)": float(np.mean(lr)) if lr else "-",
    }
    return row, example


def cost_rows(reference: Any, pool: Any, extract_s: float, args: Any) -> list[dict[str, Any]]:
    """The watch's seconds per scored image (drift test + OOD scores) at a few batch sizes."""
    import numpy as np

    from leukemia.drift import REFERENCE_RATIO, batch_drift, ood_scores

    rows = []
    for n in sorted({20, args.batch, 200}):
        batch = pool[np.arange(n) % len(pool)]
        timings, lr_s = [], logistic_auc(reference, batch, REFERENCE_RATIO, 0)[1]
        for repeat in range(5):
            started = time.perf_counter()
            batch_drift(reference, batch, seed=repeat)
            ood_scores(reference, batch)
            timings.append(time.perf_counter() - started)
        per_image = float(np.median(timings)) / n
        rows.append(
            {
                "batch": n,
                "watch s/batch": float(np.median(timings)),
                "watch s/image": per_image,
                "extraction s/image": extract_s,
                "extra cost": f"{100 * per_image / extract_s:.1f} %",
                "logistic: one 5-fold CV s": lr_s,
            }
        )
    return rows


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--variant", default="multiscale")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--pool", type=int, default=120, help="shifted images per shift")
    parser.add_argument("--null-batches", type=int, default=40)
    parser.add_argument("--shift-batches", type=int, default=20)
    parser.add_argument(
        "--compare", type=int, default=3, help="batches of the COMPARED shifts with a logistic AUC"
    )
    parser.add_argument("--stain", type=float, nargs=2, default=(0.2, 0.02), help="sigma shift")
    parser.add_argument("--brightness", type=float, default=0.75)
    parser.add_argument("--blur", type=float, default=2.0)
    parser.add_argument("--precision", default="auto", help="the feature cache's precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="extract the shifted pools again")
    args = parse_real_data_args(parser)
    run(args)


def run(args: Any) -> None:
    """Fit the references, extract the shifted pools, print the tables and the example lines."""
    import numpy as np

    from leukemia.audit import sample_rows
    from leukemia.config import CLASSES
    from leukemia.dataset import make_split, read_split
    from leukemia.drift import Reference
    from leukemia.features import cache_dir_for, resolve_precision
    from leukemia.model import ModelConfig
    from leukemia.training import split_arrays
    from leukemia.watch import WatchSettings, background_reference

    precision = resolve_precision(args.precision)
    cache = cache_dir_for(
        OUT / "quality" / "features", ModelConfig(224, str(args.weights)), precision
    )
    if not Path(cache).exists():
        raise SystemExit(f"no feature cache at {cache}: run bench/quality.py --extract first")
    rows = read_split(make_split(args.data, OUT / "quality" / "splits", seed=0).path)
    data = split_arrays(rows, cache, args.variant)
    started = time.perf_counter()
    reference = Reference.fit(*data["train"][:2], seed=args.seed)
    fit_s = time.perf_counter() - started
    WORK.mkdir(parents=True, exist_ok=True)
    size = reference.save(WORK / "reference.npz")
    print(
        f"{machine()}\nreference: {len(reference.sample)} of {reference.n_train} train features × "
        f"{reference.width} ({args.variant}, {precision}), {size:,} bytes, OOD threshold "
        f"{reference.threshold:.1f} at fpr {reference.fpr}, fitted in {fit_s:.1f} s",
        flush=True,
    )
    started = time.perf_counter()
    chosen = sample_rows(rows, "train", 500)
    background = background_reference(chosen, args.data, 224, WatchSettings.from_env())
    if background is None:
        raise SystemExit("fewer than 10 train images: no background reference")
    print(
        f"background reference: {len(background.sample)} of {len(chosen)} train images' "
        f"background features × {background.width}, fitted (images read) in "
        f"{time.perf_counter() - started:.1f} s\n",
        flush=True,
    )
    test_x, test_y = data["test"][:2]
    test_paths = [args.data / r["path"] for r in data["test"][2]]
    test_bg = backgrounds(test_paths)
    pools = shifted_pools(args, test_paths, precision)
    head = logistic(*data["train"][:2])  # stands in for the champion's predicted classes
    sets = {"none (test split)": (test_x, test_bg, args.null_batches)}
    for c, name in enumerate(CLASSES):
        if (test_y == c).sum() >= args.batch:
            one = test_y == c
            sets[f"single class {name}"] = (test_x[one], test_bg[one], args.shift_batches)
    sets.update({name: (x, bg, args.shift_batches) for name, (x, bg, _) in pools.items()})
    table_rows, examples = [], []
    for name, (x, bg, batches) in sets.items():
        compare = args.compare * (name in COMPARED)
        row, line = judge((reference, background), (x, bg), head.predict(x), batches, compare, args)
        table_rows.append({"shift": name, **row})
        examples.append(f"- {name}: {line}")
    print(
        f"\nBatches of {args.batch} against the train split (flagged: drift at p ≤ 0.01; "
        "class-matched: the reference side drawn with the batch's class mix as a logistic "
        "regression on the train features predicts it):"
    )
    print(table(table_rows))
    print("\nThe first batch of each shift as scoring reports it (`watch.DriftReport.line`):")
    print("\n".join(examples))
    extract_s = float(np.median([s for n, (_, _, s) in pools.items() if n != "float32 features"]))
    print("\nCost of the watch per scored image (median of 5; extraction: the pools' median):")
    print(table(cost_rows(reference, test_x, extract_s, args)), flush=True)


if __name__ == "__main__":
    main()
