"""Quality of the grid on the real images: every optimizer × batch size × feature variant.

Uses all of ../shared/data/leukemia-dev with its own 70/15/15 split (identical images grouped) and
the offline VGG16 weights; one extraction pass (bfloat16 where supported, as the pipeline does) serves
both variants. Prints per-configuration validation and test metrics, the configuration that selection
(validation macro-F1) picks, a logistic-regression baseline on the same frozen features, and the
float32-vs-bfloat16 difference on the same head.

    python bench/quality.py [--epochs 60] [--float32-check]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, logistic, machine, parse_real_data_args, real_data_parser, table  # noqa: E402


def logistic_baseline(x_train, y_train, x_test, y_test) -> dict[str, float]:  # noqa: ANN001
    """Test metrics of the standardised logistic regression on the frozen pooled features."""
    from leukemia.evaluation import evaluate

    return evaluate(y_test, logistic(x_train, y_train).predict_proba(x_test))["metrics"]


def rate_or_cached(ex) -> str:  # noqa: ANN001
    """The extraction rate, or where the features came from when nothing was computed."""
    return f"{ex.images_per_s:.2f}" if ex.computed else "cached (rate: bench/sweep.py)"


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--float32-check", action="store_true", help="also extract in float32 and compare"
    )
    args = parse_real_data_args(parser)

    from leukemia.dataset import make_split, read_split
    from leukemia.evaluation import evaluate
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig
    from leukemia.training import TrainConfig, fit_head, grid, split_arrays

    work = OUT / "quality"
    info = make_split(args.data, work / "splits")
    rows = read_split(info.path)
    counts = {s: sum(c.values()) for s, c in info.counts.items()}
    print(
        f"{machine()}\n{info.images} images, {info.duplicate_groups} duplicate groups kept together, "
        f"{len(info.conflicts)} label conflicts; split {counts}\n"
    )
    model_cfg = ModelConfig(input_size=224, weights=str(args.weights))
    paths = [args.data / r["path"] for r in rows]
    shas = [r["sha256"] for r in rows]
    t = time.perf_counter()
    ex = extract_features(paths, shas, model_cfg, work / "features", precision=args.precision)
    print(
        f"extraction ({ex.precision}): {ex.computed} computed, {ex.cached} cached, "
        f"{time.perf_counter() - t:.0f} s ({rate_or_cached(ex)} images/s)\n"
    )

    baseline = []
    for variant in ("seed", "multiscale"):
        data = split_arrays(rows, ex.cache_dir, variant)
        m = logistic_baseline(*data["train"][:2], *data["test"][:2])
        baseline.append(
            {"features": variant, "test accuracy": m["accuracy"], "test macro-F1": m["f1_macro"]}
        )
    print("Logistic regression on the frozen features (train → test):")
    print(table(baseline) + "\n")

    base = TrainConfig(epochs=args.epochs, patience=args.patience, model=model_cfg)
    results = []
    for cfg in grid(["adam", "sgd", "rmsprop"], [16, 32, 64], ["seed", "multiscale"], base):
        data = split_arrays(rows, ex.cache_dir, cfg.model.variant)
        t = time.perf_counter()
        head, history = fit_head(cfg, *data["train"][:2], *data["val"][:2])
        val = evaluate(data["val"][1], head.predict(data["val"][0], verbose=0))["metrics"]
        test = evaluate(data["test"][1], head.predict(data["test"][0], verbose=0))["metrics"]
        results.append(
            {
                "variant": cfg.model.variant,
                "optimizer": cfg.optimizer,
                "batch": cfg.batch_size,
                "epochs": len(history["loss"]),
                "s": time.perf_counter() - t,
                "val acc": val["accuracy"],
                "val F1": val["f1_macro"],
                "val logloss": val["log_loss"],
                "test acc": test["accuracy"],
                "test P": test["precision_macro"],
                "test R": test["recall_macro"],
                "test F1": test["f1_macro"],
                "sens": test["malignant_sensitivity"],
                "spec": test["benign_specificity"],
            }
        )
        print(
            f"  {cfg.name}: val F1 {val['f1_macro']:.3f}, test acc {test['accuracy']:.3f}",
            flush=True,
        )
    best = max(results, key=lambda r: (r["val F1"], -r["val logloss"]))
    for r in results:
        r["selected"] = "◀" if r is best else ""
    print("\nGrid (selection by validation macro-F1, ties by validation log-loss):")
    print(table(results))
    print(
        f"\nselected: {best['optimizer']} · bs{best['batch']} · {best['variant']} → test accuracy "
        f"{best['test acc']:.4f}, macro-F1 {best['test F1']:.4f}, malignant sensitivity {best['sens']:.4f}, "
        f"benign specificity {best['spec']:.4f}"
    )

    if args.float32_check and ex.precision != "float32":
        t = time.perf_counter()
        ex32 = extract_features(paths, shas, model_cfg, work / "features", precision="float32")
        print(
            f"\nfloat32 extraction: {time.perf_counter() - t:.0f} s ({rate_or_cached(ex32)} images/s)"
        )
        cfg = next(c for c in grid([best["optimizer"]], [best["batch"]], [best["variant"]], base))
        diffs = []
        for precision, cache in (("bfloat16", ex.cache_dir), ("float32", ex32.cache_dir)):
            data = split_arrays(rows, cache, cfg.model.variant)
            head, _ = fit_head(cfg, *data["train"][:2], *data["val"][:2])
            m = evaluate(data["test"][1], head.predict(data["test"][0], verbose=0))["metrics"]
            diffs.append(
                {
                    "features": precision,
                    "images/s": rate_or_cached(ex if precision == "bfloat16" else ex32),
                    "test accuracy": m["accuracy"],
                    "test macro-F1": m["f1_macro"],
                }
            )
        print("Selected configuration trained on each precision's features:")
        print(table(diffs))


if __name__ == "__main__":
    main()
