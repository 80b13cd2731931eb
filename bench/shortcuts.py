"""Shortcuts on the real images: quality and the shortcut audit with the overlay mask on and off.

Uses all of ../shared/data/leukemia-dev with the project's split (identical images grouped,
70/15/15) and the offline VGG16 weights, float32. Features come from `bench/out/quality/features`
(the cache `bench/quality.py` fills; the unmasked folder is extracted here once). For each mask
setting, augmentation setting (`augment_copies` 0 and the default, issue 17's stain and background
robustness: the copies of the train and val images are extracted into the same cache), feature
variant and head, one head (adam, batch 32) is trained on the cached features and measured on the
whole test split: accuracy, malignant sensitivity, benign specificity, and the
audit's checks (`leukemia.audit`): region classifiers on the whole train → test split beside
chance, overlay-square and background-patch swap flip rates, Grad-CAM heat in the overlay square.

Swaps: the unswapped predictions are the head on the cached features; the swapped images go
through the same extractor (`features.build_extractor`) once per mask setting and serve both
variants; a swap the model cannot see (the masked square) is not run (checked pixel by pixel).

Before that, pixels only: does per-image colour standardisation (Reinhard-style: each image's channel
means and spreads moved to the data set's) or grey levels remove the background square's cue?

    python bench/shortcuts.py [--epochs 60] [--gradcam-images 16] [--heads mlp,linear]
                              [--variants multiscale] [--copies 2] [--cached-only]
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, parse_real_data_args, real_data_parser, table  # noqa: E402


def load_all(rows, data: Path):  # noqa: ANN001, ANN201
    """Region features of every image (raw and as the masked model sees them), the whole-image
    channel statistics, and the test images' pixels."""
    import numpy as np

    from leukemia.audit import region_box, region_features, region_regions
    from leukemia.features import iter_image_batches

    feats = {True: {}, False: {}}
    stats, backs, test_pixels = [], [], []
    box = region_box("background", 224)
    for start, batch in zip(
        range(0, len(rows), 64),
        iter_image_batches([data / r["path"] for r in rows], 224, 64),
        strict=True,
    ):
        for mask in (True, False):
            for region, f in region_regions(batch, mask).items():
                feats[mask].setdefault(region, []).append(f)
        stats.append(np.stack([batch.mean(axis=(1, 2)), batch.std(axis=(1, 2)) + 1e-3], axis=1))
        backs.append(batch[(slice(None), *box)])
        for r, image in zip(rows[start : start + 64], batch, strict=True):
            if r["split"] == "test":
                test_pixels.append(image)
    feats = {m: {k: np.concatenate(v) for k, v in f.items()} for m, f in feats.items()}
    stats = np.concatenate(stats)
    back = np.concatenate(backs)
    mean, std = stats[:, 0][:, None, None, :], stats[:, 1][:, None, None, :]
    standardised = (back - mean) / std * std.mean(axis=0) + mean.mean(axis=0)
    grey = np.repeat(back.mean(axis=-1, keepdims=True), 3, axis=-1)
    whole = (slice(None), slice(None))
    colour = {
        "raw": region_features(back, whole),
        "per-image channel standardisation (Reinhard-style)": region_features(standardised, whole),
        "grey level only": region_features(grey, whole),
    }
    return feats, colour, np.stack(test_pixels)


def cached_rows(rows, weights: str):  # noqa: ANN001, ANN201
    """The rows whose features are cached with the mask on and with it off."""
    from leukemia.features import cache_dir_for, cache_index
    from leukemia.model import ModelConfig
    from leukemia.objectstore import open_store

    found = [
        set(cache_index(open_store(cache_dir_for(OUT / "quality" / "features", cfg, "float32"))))
        for cfg in (ModelConfig(224, weights, mask_overlay=m) for m in (True, False))
    ]
    return [r for r in rows if r["sha256"] in found[0] & found[1]]


def main() -> None:
    from leukemia.config import RUN_DEFAULTS

    parser = real_data_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--gradcam-images", type=int, default=16)
    parser.add_argument("--variants", default=",".join(RUN_DEFAULTS.variants))
    parser.add_argument("--heads", default=",".join(RUN_DEFAULTS.heads))
    parser.add_argument("--masks", default="on,off", help="overlay mask settings to run")
    parser.add_argument(
        "--copies",
        type=int,
        default=RUN_DEFAULTS.augment_copies,
        help="augmented copies per train and val image of the robustness rows (0: none)",
    )
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="no extraction: only the images whose features both mask settings have cached "
        "(a busy machine's partial extraction: a subset of every split, by sha256)",
    )
    args = parse_real_data_args(parser)

    import numpy as np

    from leukemia.audit import (
        SWAPS,
        as_model_sees,
        chance_level,
        flip_rates,
        overlay_heat_share,
        pick_donors,
        region_accuracy,
        swapped,
    )
    from leukemia.dataset import make_split, read_split, training_shas
    from leukemia.evaluation import evaluate
    from leukemia.features import (
        build_extractor,
        extract_features,
        labels_to_index,
        load_features,
        select_variant,
    )
    from leukemia.gradcam import GradCam
    from leukemia.model import ModelConfig, assemble, build_trunk
    from leukemia.training import TrainConfig, copy_arrays, fit_head, split_arrays, with_copies

    info = make_split(args.data, OUT / "shortcuts" / "splits")
    rows = read_split(info.path)
    counts = {s: sum(c.values()) for s, c in info.counts.items()}
    print(f"{machine()}\n{info.images} images; split {counts}", flush=True)
    if args.cached_only:
        rows = cached_rows(rows, str(args.weights))
    print(f"used: {dict(Counter(r['split'] for r in rows))}\n", flush=True)

    started = time.perf_counter()
    regions, colour, test_pixels = load_all(rows, args.data)
    split = np.array([r["split"] for r in rows])
    labels = labels_to_index([r["label"] for r in rows])
    train, test = split == "train", split == "test"
    chance = chance_level(labels[test])
    accuracy = {}
    for mask in (True, False):
        for region, x in regions[mask].items():
            accuracy[mask, region] = region_accuracy(x[train], labels[train], x[test], labels[test])
    print(f"pixels read in {time.perf_counter() - started:.0f} s")
    print("Random forest on the top-left 32 x 32 background square only (train → test):")
    print(
        table(
            [
                {
                    "background square": name,
                    "test accuracy": region_accuracy(
                        x[train], labels[train], x[test], labels[test]
                    ),
                    "chance": chance,
                }
                for name, x in colour.items()
            ]
        )
        + "\n",
        flush=True,
    )

    test_rows = [r for r in rows if r["split"] == "test"]
    y_test = labels_to_index([r["label"] for r in test_rows])
    donors = pick_donors(y_test, seed=0)
    results = []
    for mask in [m == "on" for m in args.masks.split(",")]:
        model_cfg = ModelConfig(input_size=224, weights=str(args.weights), mask_overlay=mask)
        started = time.perf_counter()
        ex = extract_features(  # with --cached-only: every image is cached, nothing is computed
            [args.data / r["path"] for r in rows],
            [r["sha256"] for r in rows],
            model_cfg,
            OUT / "quality" / "features",
            precision="float32",
            augment=training_shas(rows),
            copies=args.copies,
        )
        print(
            f"mask {mask}: extraction {ex.computed} computed, {ex.cached} cached, "
            f"{ex.augmented} augmented copies computed, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        started = time.perf_counter()
        cached_test = load_features(ex.cache_dir, [r["sha256"] for r in test_rows], "multiscale")
        seen = as_model_sees(test_pixels, mask)
        extractor = None
        swapped_rows = {}
        for swap in SWAPS:
            images = swapped(test_pixels, donors, swap)
            if np.array_equal(as_model_sees(images, mask), seen):
                swapped_rows[swap] = cached_test  # the model cannot see what was pasted
                continue
            extractor = extractor or build_extractor(model_cfg, "float32")
            swapped_rows[swap] = np.concatenate(
                [
                    np.asarray(extractor.predict_on_batch(images[i : i + 32]), dtype="float32")
                    for i in range(0, len(images), 32)
                ]
            )
        swap_seconds = time.perf_counter() - started
        trunk = build_trunk(model_cfg)
        settings = [
            (copies, variant, head)
            for copies in sorted({0, args.copies})
            for variant in args.variants.split(",")
            for head in args.heads.split(",")
        ]
        for copies, variant, head in settings:
            cfg = TrainConfig(
                epochs=args.epochs,
                patience=args.patience,
                augment_copies=copies,
                model=ModelConfig(
                    224, str(args.weights), variant=variant, mask_overlay=mask, head=head
                ),
            )
            data = split_arrays(rows, ex.cache_dir, variant)
            extra = copy_arrays(data, ex.cache_dir, variant, copies)
            head_model, _ = fit_head(
                cfg, *with_copies(*data["train"][:2], extra["train"]), *data["val"][:2]
            )
            quality = evaluate(data["test"][1], head_model.predict(data["test"][0], verbose=0))[
                "metrics"
            ]
            before = head_model.predict(select_variant(cached_test, variant), verbose=0)
            before = before.argmax(axis=1)
            flips = {}
            for swap in SWAPS:
                after = head_model.predict(select_variant(swapped_rows[swap], variant), verbose=0)
                flips[swap] = flip_rates(before, after.argmax(axis=1), y_test[donors])
            started = time.perf_counter()
            cam = GradCam(assemble(cfg.model, trunk, head_model))
            heat = np.concatenate(
                [
                    cam(test_pixels[i : min(i + 8, args.gradcam_images)])[0]
                    for i in range(0, args.gradcam_images, 8)
                ]
            )
            results.append(
                {
                    "mask": "on" if mask else "off",
                    "augmented copies": copies,
                    "variant": variant,
                    "head": head,
                    "test acc": quality["accuracy"],
                    "errors": int(round((1 - quality["accuracy"]) * len(y_test))),
                    "malignant sens.": quality["malignant_sensitivity"],
                    "benign spec.": quality["benign_specificity"],
                    "overlay RF": accuracy[mask, "overlay"],
                    "backgr. RF": accuracy[mask, "background"],
                    "chance": chance,
                    "overlay swap: changed": f"{flips['corner'][0]:.1%}",
                    "→ donor": f"{flips['corner'][1]:.1%}",
                    "backgr. swap: changed": f"{flips['background'][0]:.1%}",
                    "→ donor ": f"{flips['background'][1]:.1%}",
                    "Grad-CAM heat in square": f"{overlay_heat_share(heat):.1%}",
                }
            )
            print(
                table(results[-1:]) + f"\n(swapped features {swap_seconds:.0f} s, Grad-CAM "
                f"{time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    print(
        f"\nTest images swapped: {len(test_rows)} (donor: a test image of another class, seed 0); "
        f"Grad-CAM over the first {args.gradcam_images} test images; the overlay square is "
        f"{32 * 32 / 224**2:.1%} of the image.\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
