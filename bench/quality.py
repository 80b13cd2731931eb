"""Quality of the selection strategies on the real images: what the champion is today vs refit vs
cross-validated selection vs the linear head, on the project's split and on grouped resplits.

Uses all of ../shared/data/leukemia-dev: the project's 70/15/15 split (seed 0, identical images
grouped) and `--resplits` more splits made the same way with other seeds (grouped, stratified), all
on one feature cache (224 px, masked, the offline VGG16 weights; extracted once: `--extract`).
Every configuration of the grid (optimizer × batch size × variant × head) is fitted train → val
(early stopping, as today) and scored by k-fold CV over train + val; then each method selects and
trains its model:

    current       mlp grid, selected by validation macro-F1, the train-only head (today)
    refit         the same selection, trained again on train + val for the epochs it kept
    refit×n       the same, the epochs scaled by (train + val) / train images
    cv            mlp grid, selected by mean CV macro-F1 (ties: CV log-loss), train-only head
    cv+refit      the cv selection refitted on train + val (epochs: the folds' mean kept epoch)
    linear        linear grid, CV selection, refit
    mlp+linear    both heads, CV selection, refit (same epochs)
    default       both heads, CV selection, refit with scaled epochs: the pipeline's defaults
                  without the augmented copies of issue 17 (`augment_copies` 0: every resplit
                  would need copies of every image; bench/shortcuts.py measures the copies on the
                  project's split)
    default+ensemble3  the default with `ensemble_top_k` 3: the mean softmax of the top 3 heads by
                  CV (train-only heads), chosen only when its out-of-fold macro-F1 beats the best
                  member's, else the default's refit

Prints, per method, accuracy, macro-F1, malignant sensitivity and benign specificity on the test
images with bootstrap 95 % intervals (percentile, over test images), the errors, and the training
wall time of the grid (features cached; what the training tasks spend, on this machine).

    python bench/quality.py [--resplits 5] [--cv-folds 5] [--epochs 30] [--patience 5]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, parse_real_data_args, real_data_parser, table  # noqa: E402

from leukemia.config import RUN_DEFAULTS  # noqa: E402

METRICS = ("accuracy", "f1_macro", "malignant_sensitivity", "benign_specificity")
#: method → (heads in its grid, selection, refit epochs: None (train-only), "fixed" or "scaled")
METHODS: dict[str, tuple[tuple[str, ...], str, str | None]] = {
    "current": (("mlp",), "val", None),
    "refit": (("mlp",), "val", "fixed"),
    "refit×n": (("mlp",), "val", "scaled"),
    "cv": (("mlp",), "cv", None),
    "cv+refit": (("mlp",), "cv", "fixed"),
    "cv+refit×n": (("mlp",), "cv", "scaled"),
    "linear": (("linear",), "cv", "fixed"),
    "mlp+linear": (("mlp", "linear"), "cv", "fixed"),
    "default": (("mlp", "linear"), "cv", "scaled"),  # what the pipeline does with its defaults
}
#: The default pipeline with `ensemble_top_k` 3 (see `ensemble_method`).
ENSEMBLE = "default+ensemble3"
ENSEMBLE_TOP_K = 3


def scores(y: Any, pred: Any) -> dict[str, float]:
    """The four metrics from labels and predicted classes (numpy, fast enough to bootstrap)."""
    import numpy as np

    from leukemia.config import BENIGN, CLASSES

    k = len(CLASSES)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype("float64")
    precision = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(k), where=cm.sum(1) > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0
    )
    b = CLASSES.index(BENIGN)
    malignant = y != b
    return {
        "accuracy": float(tp.sum() / len(y)),
        "f1_macro": float(f1.mean()),
        "malignant_sensitivity": float(((pred != b) & malignant).sum() / max(malignant.sum(), 1)),
        "benign_specificity": float(((pred == b) & ~malignant).sum() / max((~malignant).sum(), 1)),
    }


def with_intervals(y: Any, pred: Any, resamples: int, seed: int = 0) -> dict[str, str]:
    """Each metric as `value [low, high]`: bootstrap 95 % percentile interval over the images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    point = scores(y, pred)
    draws = [scores(y[i], pred[i]) for i in rng.integers(0, len(y), (resamples, len(y)))]
    out = {}
    for m in METRICS:
        low, high = np.percentile([d[m] for d in draws], [2.5, 97.5])
        out[m] = f"{point[m]:.4f} [{low:.3f}, {high:.3f}]"
    out["errors"] = f"{int((y != pred).sum())} / {len(y)}"
    return out


def evaluate_split(rows: list[dict[str, str]], cache_dir: str, args: Any) -> dict[str, Any]:
    """Fit the whole grid on one split; per method the test predictions, selection and seconds."""
    import numpy as np

    from leukemia.evaluation import evaluate
    from leukemia.model import ModelConfig
    from leukemia.runs import train_val_arrays
    from leukemia.training import (
        TrainConfig,
        best_epoch,
        cross_validate,
        fit_head,
        grid,
        split_arrays,
    )

    data = {v: split_arrays(rows, cache_dir, v) for v in args.variants}
    base = TrainConfig(
        epochs=args.epochs,
        patience=args.patience,
        cv_folds=args.cv_folds,
        model=ModelConfig(input_size=224, weights=str(args.weights)),
    )
    configs = grid(args.optimizers, args.batch_sizes, args.variants, base, ["mlp", "linear"])
    fitted = []
    for cfg in configs:
        d = data[cfg.model.variant]
        t = time.perf_counter()
        head, history = fit_head(cfg, *d["train"][:2], *d["val"][:2])
        fit_s = time.perf_counter() - t
        val = evaluate(d["val"][1], np.asarray(head(d["val"][0], training=False)))["metrics"]
        test_prob = np.asarray(head(d["test"][0], training=False))
        t = time.perf_counter()
        cv = cross_validate(cfg, *train_val_arrays(d)) if args.cv_folds > 1 else {}
        cv_s = time.perf_counter() - t
        fitted.append(
            {
                "cfg": cfg,
                "val": (val["f1_macro"], -val["log_loss"]),
                "cv": (cv.get("f1_macro_mean", 0.0), -cv.get("log_loss_mean", 0.0)),
                "best_epoch": best_epoch(history),
                "cv_best_epoch": cv.get("best_epoch_mean", best_epoch(history)),
                "test_pred": test_prob.argmax(1),
                "test_prob": test_prob,
                "oof": cv.get("oof"),
                "fit_s": fit_s,
                "cv_s": cv_s,
            }
        )
        print(
            f"    {cfg.name}: val F1 {val['f1_macro']:.4f}, CV F1 {cv.get('f1_macro_mean', 0):.4f} "
            f"({fit_s:.1f} s + CV {cv_s:.1f} s)",
            flush=True,
        )
    refits: dict[tuple[str, int], tuple[Any, float]] = {}
    out: dict[str, Any] = {}
    for method, (heads, selection, epochs_rule) in METHODS.items():
        pool = [f for f in fitted if f["cfg"].model.head in heads]
        best = max(pool, key=lambda f: f[selection])
        seconds = sum(f["fit_s"] + (f["cv_s"] if selection == "cv" else 0.0) for f in pool)
        cfg, d = best["cfg"], data[best["cfg"].model.variant]
        label = cfg.name
        pred = best["test_pred"]
        if epochs_rule:
            x, y, _ = train_val_arrays(d)
            found = best["cv_best_epoch"] if selection == "cv" else best["best_epoch"]
            fit_images = (
                len(y) * (args.cv_folds - 1) / args.cv_folds
                if selection == "cv"
                else len(d["train"][1])
            )
            epochs = max(1, round(found * (len(y) / fit_images if epochs_rule == "scaled" else 1)))
            key = (cfg.name, epochs)
            if key not in refits:
                t = time.perf_counter()
                head, _ = fit_head(replace(cfg, epochs=epochs), x, y, None, None)
                refits[key] = (
                    np.asarray(head(d["test"][0], training=False)).argmax(1),
                    time.perf_counter() - t,
                )
            pred, refit_s = refits[key]
            seconds += refit_s
            label += f" → refit {epochs} ep"
        out[method] = {"pred": pred, "y": d["test"][1], "selected": label, "seconds": seconds}
    if args.cv_folds > 1:
        y_cv = train_val_arrays(data[configs[0].model.variant])[1]
        out[ENSEMBLE] = ensemble_method(fitted, y_cv, out["default"])
    return out


def ensemble_method(fitted: list[dict[str, Any]], y_cv: Any, default: dict[str, Any]) -> dict:
    """The pipeline's ensemble stage on top of the default: the mean softmax of the top-k train-only
    heads by mean CV macro-F1 (`ensemble.select_ensemble` builds it from the same heads), chosen
    only when its out-of-fold macro-F1 beats the best member's (`ensemble.choose`); else the
    default's refit stays."""
    import numpy as np

    from leukemia.ensemble import ENSEMBLE as CHOSEN
    from leukemia.ensemble import choose

    top = sorted(fitted, key=lambda f: f["cv"], reverse=True)[:ENSEMBLE_TOP_K]
    choice = choose({f["cfg"].name: f["oof"] for f in top}, y_cv, "cv")
    if choice["choice"] != CHOSEN:
        return {
            **default,
            "selected": f"single (OOF F1 {choice['ensemble_f1_macro']:.4f} ≤ "
            f"{choice['single_f1_macro']:.4f}): {default['selected']}",
        }
    pred = np.mean([f["test_prob"] for f in top], axis=0).argmax(1)
    label = " + ".join(f["cfg"].name for f in top)
    return {**default, "pred": pred, "selected": f"ensemble of {label}"}


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--resplits", type=int, default=5, help="grouped resplits besides seed 0")
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30, help="the pipeline's default")
    parser.add_argument("--patience", type=int, default=5, help="the pipeline's default")
    parser.add_argument("--optimizers", nargs="+", default=["adam", "sgd", "rmsprop"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--variants", nargs="+", default=list(RUN_DEFAULTS.variants))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--extract", action="store_true", help="extract the features not cached yet (slow)"
    )
    args = parse_real_data_args(parser)

    from leukemia.dataset import make_split, read_split
    from leukemia.features import cache_dir_for, extract_features, load_features, resolve_precision
    from leukemia.model import ModelConfig

    work = OUT / "quality"
    splits = [make_split(args.data, work / "splits", seed=s) for s in range(args.resplits + 1)]
    rows0 = read_split(splits[0].path)
    model_cfg = ModelConfig(input_size=224, weights=str(args.weights))
    cache = cache_dir_for(work / "features", model_cfg, resolve_precision(args.precision))
    if args.extract:
        extract_features(
            [args.data / r["path"] for r in rows0],
            [r["sha256"] for r in rows0],
            model_cfg,
            work / "features",
            precision=args.precision,
        )
    try:
        load_features(cache, [r["sha256"] for r in rows0], "seed")
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise SystemExit(f"features of {cache} incomplete ({exc}): run with --extract") from None
    counts = {s: sum(c.values()) for s, c in splits[0].counts.items()}
    print(
        f"{machine()}\n{splits[0].images} images, {splits[0].duplicate_groups} duplicate groups "
        f"kept together; project split {counts}; {args.resplits} grouped resplits (seeds 1-"
        f"{args.resplits}); grid {args.optimizers} × {args.batch_sizes} × {args.variants} × "
        f"[mlp, linear], epochs {args.epochs}, patience {args.patience}, {args.cv_folds}-fold CV\n",
        flush=True,
    )
    per_split = []
    for info in splits:
        print(f"  split seed {len(per_split)}:", flush=True)
        per_split.append(evaluate_split(read_split(info.path), cache, args))
        report(per_split, args.bootstrap)  # after every split: a long run shows what it has so far


def report(per_split: list[dict[str, Any]], resamples: int) -> None:
    """The tables of the splits done so far: the project split, the resplits pooled, selections."""
    import numpy as np

    def block(title: str, results: list[dict[str, Any]]) -> None:
        rows = []
        for method in [m for m in (*METHODS, ENSEMBLE) if m in results[0]]:
            y = np.concatenate([r[method]["y"] for r in results])
            pred = np.concatenate([r[method]["pred"] for r in results])
            seconds = float(np.mean([r[method]["seconds"] for r in results]))
            rows.append({"method": method, **with_intervals(y, pred, resamples), "grid s": seconds})
        print(f"\n{title}")
        print(table(rows, ["method", *METRICS, "errors", "grid s"]))

    block("Project split (seed 0), test images:", per_split[:1])
    if len(per_split) > 1:
        block(
            f"{len(per_split) - 1} grouped resplits (seeds 1-{len(per_split) - 1}), test images "
            "pooled; grid s: mean per split:",
            per_split[1:],
        )
    print("\nSelected configuration per split:")
    selections = [
        {"method": m, **{f"seed {i}": r[m]["selected"] for i, r in enumerate(per_split)}}
        for m in (*METHODS, ENSEMBLE)
        if m in per_split[0]
    ]
    print(table(selections), flush=True)


if __name__ == "__main__":
    main()
