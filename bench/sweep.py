"""The 9-configuration grid: cached features against the reference way, side by side in one run.

Reference way: each configuration runs `model.fit` on the images, so the frozen VGG16 base runs
forward on every image in every epoch. Cached way: one extraction pass, then every configuration fits
the head on cached features. Both use the same subset, epochs, weights and float32 precision; the
reference is timed on a few configurations and extrapolated to nine (it is linear in configurations).

    python bench/sweep.py --images 300 --epochs 3
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OUT,
    VGG16_GFLOP_224,
    machine,
    matmul_gflops,
    parse_real_data_args,
    real_data_parser,
    table,
)

GRID = [(o, b) for o in ("adam", "sgd", "rmsprop") for b in (16, 32, 64)]


def keras_fit_head(cfg, x_train, y_train, x_val, y_val) -> None:  # noqa: ANN001
    """The head trained with Keras' own `fit` (what `fit_head` did before its compiled-step loop):
    same head, optimizer, epochs and early stopping, for the side-by-side row."""
    import keras

    from leukemia.model import adapted_normalization, build_head
    from leukemia.training import make_optimizer

    keras.utils.set_random_seed(cfg.seed)
    head = build_head(cfg.model, adapted_normalization(x_train))
    head.compile(
        optimizer=make_optimizer(cfg.optimizer, cfg.lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(patience=cfg.patience, restore_best_weights=True)
    head.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        verbose=0,
        callbacks=[stop],
    )


def subset(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """About n rows, the same share of each class, deterministic."""
    from collections import defaultdict

    by_class: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["sha256"]):
        by_class[r["label"]].append(r)
    share = n / len(rows)
    return [r for group in by_class.values() for r in group[: max(3, round(len(group) * share))]]


def print_throughput(paths: list, model_cfg, work: Path) -> None:  # noqa: ANN001
    """Extraction throughput at 224×224 in both precisions against the measured matmul peak."""
    from leukemia.features import extract_features

    peak = []
    for precision in ("float32", "bfloat16"):
        sample = paths[:96]
        res = extract_features(
            sample,
            [f"{i:064d}" for i in range(len(sample))],
            model_cfg,
            work / f"throughput-{precision}",
            precision=precision,
        )
        ips = res.images_per_s
        gflops = matmul_gflops(precision)
        peak.append(
            {
                "precision": precision,
                "images/s": ips,
                "achieved GFLOP/s": ips * VGG16_GFLOP_224,
                "matmul GFLOP/s (best of 5)": gflops,
                "fraction of matmul peak": ips * VGG16_GFLOP_224 / gflops,
            }
        )
    print("\nExtraction throughput at 224×224 (96 images, after the model is built):")
    print(table(peak))


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--reference-configs", type=int, default=2, help="reference configs actually timed"
    )
    parser.add_argument(
        "--throughput-only", action="store_true", help="only the extraction-throughput table"
    )
    args = parse_real_data_args(parser)

    import numpy as np

    from leukemia.dataset import make_split, read_split
    from leukemia.features import extract_features, labels_to_index, load_features, load_images
    from leukemia.model import ModelConfig, build_model
    from leukemia.training import TrainConfig, fit_head, make_optimizer

    work = OUT / "sweep"
    shutil.rmtree(work, ignore_errors=True)
    info = make_split(args.data, work / "splits")
    all_rows = read_split(info.path)
    rows = subset(all_rows, args.images)
    train_rows = [r for r in rows if r["split"] != "val"]  # train+test: more training images
    val_rows = [r for r in rows if r["split"] == "val"]
    model_cfg = ModelConfig(input_size=224, weights=str(args.weights), variant="seed")
    paths = [args.data / r["path"] for r in rows]
    if args.throughput_only:
        print(machine())
        print_throughput(paths, model_cfg, work)
        return

    print(
        f"{machine()}\n{len(rows)} images ({len(train_rows)} train, {len(val_rows)} val), {args.epochs} epochs\n"
    )

    # Cached way: one pass, then nine head fits.
    t0 = time.perf_counter()
    ex = extract_features(
        paths, [r["sha256"] for r in rows], model_cfg, work / "features", precision="float32"
    )
    extract_s = time.perf_counter() - t0
    xt = load_features(ex.cache_dir, [r["sha256"] for r in train_rows], "seed")
    xv = load_features(ex.cache_dir, [r["sha256"] for r in val_rows], "seed")
    yt, yv = (
        labels_to_index([r["label"] for r in train_rows]),
        labels_to_index([r["label"] for r in val_rows]),
    )
    configs = [
        TrainConfig(
            optimizer=optimizer,
            batch_size=batch,
            epochs=args.epochs,
            patience=args.epochs,
            model=model_cfg,
        )
        for optimizer, batch in GRID
    ]
    head_s, keras_fit_s = [], []
    for cfg in configs:  # alternated, so that both head loops see the same machine state
        t = time.perf_counter()
        fit_head(cfg, xt, yt, xv, yv)
        head_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        keras_fit_head(cfg, xt, yt, xv, yv)
        keras_fit_s.append(time.perf_counter() - t)
    cached_total = extract_s + sum(head_s)
    keras_fit_total = extract_s + sum(keras_fit_s)

    # Reference way: the full model fitted on images, the base forward every epoch.
    images_t = load_images([args.data / r["path"] for r in train_rows], 224)
    images_v = load_images([args.data / r["path"] for r in val_rows], 224)
    ref_s = []
    for optimizer, batch in GRID[:: max(1, len(GRID) // args.reference_configs)][
        : args.reference_configs
    ]:
        import keras

        keras.utils.set_random_seed(0)
        model = build_model(model_cfg)
        model.compile(
            make_optimizer(optimizer, 1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        t = time.perf_counter()
        model.fit(
            images_t,
            yt,
            validation_data=(images_v, yv),
            epochs=args.epochs,
            batch_size=batch,
            verbose=0,
        )
        ref_s.append(time.perf_counter() - t)
    ref_per_config = float(np.mean(ref_s))
    ref_total = ref_per_config * len(GRID)

    scale = len(all_rows) / len(rows)
    rows_out = [
        {
            "way": "reference (fit on images)",
            "measured configs": len(ref_s),
            "seconds per config": ref_per_config,
            f"grid of 9, {len(rows)} images (s)": ref_total,
            f"grid of 9, all {len(all_rows)} images (s)": ref_total * scale,
            "× one extraction pass": ref_total / extract_s,
        },
        {
            "way": "cached features, head with keras `fit`",
            "measured configs": len(keras_fit_s),
            "seconds per config": float(np.mean(keras_fit_s)),
            f"grid of 9, {len(rows)} images (s)": keras_fit_total,
            f"grid of 9, all {len(all_rows)} images (s)": keras_fit_total * scale,
            "× one extraction pass": keras_fit_total / extract_s,
        },
        {
            "way": "cached features, `fit_head` (the pipeline)",
            "measured configs": len(head_s),
            "seconds per config": float(np.mean(head_s)),
            f"grid of 9, {len(rows)} images (s)": cached_total,
            f"grid of 9, all {len(all_rows)} images (s)": cached_total * scale,
            "× one extraction pass": cached_total / extract_s,
        },
    ]
    print(table(rows_out))
    print(
        f"\none extraction pass: {extract_s:.1f} s for {len(rows)} images ({len(rows) / extract_s:.2f} images/s, float32)"
    )
    print(
        f"speed-up of the grid: {ref_total / cached_total:.1f}×; target grid ≤ 1.2 × one pass: "
        f"{'met' if cached_total <= 1.2 * extract_s else 'MISSED'} ({cached_total / extract_s:.2f}×)"
    )

    print_throughput(paths, model_cfg, work)


if __name__ == "__main__":
    main()
