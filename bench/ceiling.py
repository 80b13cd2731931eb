"""How far frozen offline-weight VGG16 features can go: the ceiling behind issue 7's 0.99 target.

Every number here is a standardised logistic regression on frozen features of
../shared/data/leukemia-dev (the heads of bench/quality.py reach the same accuracy), so it measures
the features, not the head:

1. the multiscale features on N other grouped, stratified 70/30 splits of the same images
   (`make_split` with seeds 1..N): how much the accuracy moves with the split alone;
2. on the project's split (seed 0, 70/15/15, as bench/quality.py): what the cheap feature-side
   remedies give — flips as training augmentation and test-time averaging (4 views), the image
   upsampled to 320 px, and both scales concatenated. Each view is one more extraction pass;
3. with `--finetune-epochs N`, the remedy that is not feature-side: VGG16's block 5 trained (not
   frozen) with a new head, on cached block4_pool maps of the same split (Adam 1e-4, batch 32,
   mixed bfloat16), test accuracy after every epoch — a probe for a follow-up, not a pipeline
   feature.

    python bench/ceiling.py [--resplits 8] [--views] [--finetune-epochs 8]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, logistic, machine, parse_real_data_args, real_data_parser, table  # noqa: E402

#: Image transforms (on a batch n×h×w×3) for the flip views.
FLIPS = {
    "identity": lambda a: a,
    "flip left-right": lambda a: a[:, :, ::-1],
    "flip up-down": lambda a: a[:, ::-1],
    "rotate 180°": lambda a: a[:, ::-1, ::-1],
}


def scores(y_true, probs) -> dict[str, float]:  # noqa: ANN001
    """Accuracy, macro-F1, errors, malignant sensitivity of averaged probabilities."""
    from leukemia.evaluation import evaluate

    m = evaluate(y_true, probs)["metrics"]
    return {
        "test images": len(y_true),
        "errors": int(round((1 - m["accuracy"]) * len(y_true))),
        "test acc": m["accuracy"],
        "test F1": m["f1_macro"],
        "sens": m["malignant_sensitivity"],
        "spec": m["benign_specificity"],
    }


def view_features(paths, size: int, flip: str, weights: Path, cache: Path):  # noqa: ANN001, ANN201
    """Multiscale features of every image under one view, cached as one .npy per view."""
    import numpy as np

    from leukemia.features import build_extractor, load_images, resolve_precision, select_variant
    from leukemia.model import ModelConfig

    out = cache / f"{size}px-{flip.replace(' ', '_')}.npy"
    if out.exists():
        return np.load(out)
    precision = resolve_precision("auto")
    extractor = build_extractor(ModelConfig(size, str(weights)), precision)
    started, parts = time.perf_counter(), []
    for start in range(0, len(paths), 32):
        batch = FLIPS[flip](load_images(paths[start : start + 32], size))
        parts.append(np.asarray(extractor.predict_on_batch(np.ascontiguousarray(batch))))
    feats = select_variant(np.concatenate(parts).astype("float32"), "multiscale")
    print(
        f"  extracted {size} px · {flip}: {time.perf_counter() - started:.0f} s ({precision})",
        flush=True,
    )
    cache.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    return feats


def finetune_block5(paths, y, split, weights: Path, epochs: int, cache: Path) -> list[dict]:  # noqa: ANN001
    """Block 5 (3 convolutions, 7.1 M parameters) + GAP/GMP + Dense 256 trained on block4_pool maps."""
    import keras
    import numpy as np

    from leukemia.features import load_images
    from leukemia.model import build_preprocess

    keras.config.set_dtype_policy("mixed_bfloat16")
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    base.load_weights(weights)
    maps_file = cache / "block4_pool-224px-bfloat16.npy"
    if not maps_file.exists():
        inputs = keras.Input((224, 224, 3))
        trunk = keras.Model(base.inputs, base.get_layer("block4_pool").output)
        model = keras.Model(inputs, trunk(build_preprocess(224)(inputs)))
        parts = [
            np.asarray(model.predict_on_batch(load_images(paths[i : i + 32], 224)), "float16")
            for i in range(0, len(paths), 32)
        ]
        np.save(maps_file, np.concatenate(parts))
    maps = np.load(maps_file)
    inputs = keras.Input(maps.shape[1:])
    x = inputs
    for name in ("block5_conv1", "block5_conv2", "block5_conv3"):
        layer = keras.layers.Conv2D(512, 3, padding="same", activation="relu", name=name)
        x = layer(x)
        layer.set_weights(base.get_layer(name).get_weights())
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Concatenate()(
        [keras.layers.GlobalAveragePooling2D()(x), keras.layers.GlobalMaxPooling2D()(x)]
    )
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.5)(keras.layers.Dense(256, activation="relu")(x))
    outputs = keras.layers.Dense(4, activation="softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    train, val, test = (split == s for s in ("train", "val", "test"))
    out = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.fit(maps[train], y[train], batch_size=32, epochs=1, verbose=0)
        seconds = time.perf_counter() - started
        val_acc = float((model.predict(maps[val], verbose=0).argmax(1) == y[val]).mean())
        out.append(
            {
                "epoch": epoch,
                "s": seconds,
                "val acc": val_acc,
                **scores(y[test], model.predict(maps[test], verbose=0)),
            }
        )
        print(
            f"  fine-tune epoch {epoch}: val {val_acc:.4f}, test {out[-1]['test acc']:.4f}",
            flush=True,
        )
    keras.config.set_dtype_policy("float32")
    return out


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--resplits", type=int, default=8)
    parser.add_argument(
        "--views", action="store_true", help="also the flip and 320 px views (4 more passes)"
    )
    parser.add_argument("--finetune-epochs", type=int, default=0)
    args = parse_real_data_args(parser)

    import numpy as np

    from leukemia.dataset import make_split, read_split
    from leukemia.features import extract_features, labels_to_index, load_features
    from leukemia.model import ModelConfig

    work = OUT / "ceiling"
    rows = read_split(make_split(args.data, work / "splits").path)
    shas = [r["sha256"] for r in rows]
    paths = [args.data / r["path"] for r in rows]
    ex = extract_features(
        paths, shas, ModelConfig(224, str(args.weights)), OUT / "quality" / "features"
    )
    x = load_features(ex.cache_dir, shas, "multiscale")
    y = labels_to_index([r["label"] for r in rows])
    print(f"{machine()}\n{len(rows)} images, multiscale features ({ex.precision})\n")

    # 1. The same features on other splits.
    by_sha = {s: i for i, s in enumerate(shas)}
    resplit = []
    for seed in range(1, args.resplits + 1):
        other = read_split(make_split(args.data, work / "splits", seed, (0.7, 0.0, 0.3)).path)
        train = np.array([by_sha[r["sha256"]] for r in other if r["split"] == "train"])
        test = np.array([by_sha[r["sha256"]] for r in other if r["split"] == "test"])
        clf = logistic(x[train], y[train])
        resplit.append({"split seed": seed, **scores(y[test], clf.predict_proba(x[test]))})
    accs = [r["test acc"] for r in resplit]
    print(f"Logistic regression on multiscale features, {args.resplits} grouped 70/30 splits:")
    print(table(resplit))
    print(
        f"accuracy mean {np.mean(accs):.4f}, min {min(accs):.4f}, max {max(accs):.4f}; "
        f"splits at ≥ 0.99: {sum(a >= 0.99 for a in accs)} of {len(accs)}\n"
    )
    split = np.array([r["split"] for r in rows])
    if args.finetune_epochs:
        print("Block 5 fine-tuned on the project's split (train → val, test after every epoch):")
        print(table(finetune_block5(paths, y, split, args.weights, args.finetune_epochs, work)))
        print()
    if not args.views:
        return

    # 2. Feature-side remedies on the project's split.
    train, test = split == "train", split == "test"
    views = {"identity": x}  # the pipeline's own cached pass
    views.update({n: view_features(paths, 224, n, args.weights, work) for n in list(FLIPS)[1:]})
    views["320 px"] = view_features(paths, 320, "identity", args.weights, work)
    views["224 + 320 px"] = np.concatenate([views["identity"], views["320 px"]], axis=1)

    def fit_views(train_views: list[str], test_views: list[str]) -> dict:
        xt = np.concatenate([views[v][train] for v in train_views])
        clf = logistic(xt, np.tile(y[train], len(train_views)))
        probs = np.mean([clf.predict_proba(views[v][test]) for v in test_views], axis=0)
        return scores(y[test], probs)

    flips = list(FLIPS)
    remedies = [
        ("224 px, as the pipeline", "1×", fit_views(["identity"], ["identity"])),
        ("4 flip views averaged at test", "4×", fit_views(["identity"], flips)),
        ("4 flip views: train augmentation + test average", "4×", fit_views(flips, flips)),
        ("upsampled to 320 px", "2×", fit_views(["320 px"], ["320 px"])),
        ("224 and 320 px concatenated", "3×", fit_views(["224 + 320 px"], ["224 + 320 px"])),
    ]
    print("Logistic regression on the project's split (train → test), per feature recipe:")
    print(table([{"recipe": n, "extraction cost": c, **s} for n, c, s in remedies]))


if __name__ == "__main__":
    main()
