"""Calibration and referral of the default pipeline on the real images (issue 24's targets).

For the project's split (seed 0) and `--resplits` grouped resplits of ../shared/data/leukemia-dev
(`bench/quality.py`'s splits and feature cache: run `bench/quality.py --extract` once, or this
script with `--extract`), the default pipeline is replayed as the DAG runs it: every configuration
of the default grid (optimizers × batch sizes × variants × heads) is fitted train → val and
cross-validated over train + val (out-of-fold probabilities), the best by mean CV macro-F1 is
refitted on train + val with scaled epochs (`runs.refit_epochs`), and, as `runs.train_run` /
`runs.refit_run` do, the temperature and the conformal threshold are fitted on the selected
configuration's out-of-fold probabilities (`calibration.Calibration.fit`) and applied to the
refit's test probabilities.

Prints per split and pooled over the resplits: test ECE (15 bins) and Brier before and after
scaling, the temperature, the coverage of the prediction sets and the referral rate at
`--coverage`, the mean set size, malignant sensitivity and benign specificity among the images
*not* referred, and the malignant images called benign without referral; then the same referral
rate and misses with a *benign floor* added (`benign_floor_rule`: every benign call whose malignant
probability reaches the smallest one of the out-of-fold misses is referred too), the rule tried for
the no-unreferred-miss target. Targets: coverage ≥
0.95, referral ≤ 5 %, no malignant image called benign without referral, ECE ≤ 0.02.

    python bench/calibration.py [--resplits 5] [--coverage 0.95] [--cv-folds 5]
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


def replay_default(rows: list[dict[str, str]], cache_dir: Path, args: Any) -> dict[str, Any]:
    """The default grid on one split: the selected configuration's out-of-fold probabilities and
    labels, and its refit's test probabilities and labels."""
    import numpy as np

    from leukemia.model import ModelConfig
    from leukemia.runs import refit_epochs, train_val_arrays
    from leukemia.training import (
        TrainConfig,
        best_epoch,
        cross_validate,
        fit_head,
        grid,
        split_arrays,
    )

    data = {v: split_arrays(rows, cache_dir, v) for v in RUN_DEFAULTS.variants}
    base = TrainConfig(
        cv_folds=args.cv_folds, model=ModelConfig(input_size=224, weights=str(args.weights))
    )
    configs = grid(
        list(RUN_DEFAULTS.optimizers),
        list(RUN_DEFAULTS.batch_sizes),
        list(RUN_DEFAULTS.variants),
        base,
        list(RUN_DEFAULTS.heads),
    )
    best: dict[str, Any] | None = None
    for cfg in configs:
        d = data[cfg.model.variant]
        _, history = fit_head(cfg, *d["train"][:2], *d["val"][:2])
        cv = cross_validate(cfg, *train_val_arrays(d))
        key = (cv["f1_macro_mean"], -cv["log_loss_mean"])
        if best is None or key > best["key"]:
            best = {"key": key, "cfg": cfg, "cv": cv, "best_epoch": best_epoch(history)}
    assert best is not None
    cfg, d = best["cfg"], data[best["cfg"].model.variant]
    x, y, _ = train_val_arrays(d)
    metrics = {"cv_best_epoch_mean": best["cv"]["best_epoch_mean"]}
    epochs = refit_epochs(metrics, len(y) * (args.cv_folds - 1) / args.cv_folds, len(y))
    head, _ = fit_head(replace(cfg, epochs=epochs), x, y, None, None)
    return {
        "selected": f"{cfg.name} → refit {epochs} ep",
        "oof": best["cv"]["oof"],
        "y_oof": y,
        "test": np.asarray(head(d["test"][0], training=False)),
        "y_test": d["test"][1],
    }


def cached_replay(seed: int, rows: list[dict[str, str]], cache: Path, args: Any) -> dict[str, Any]:
    """`replay_default`, its probabilities kept in bench/out/calibration/ (`--again` to refit)."""
    import numpy as np

    path = OUT / "calibration" / f"seed{seed}-{Path(cache).name}-k{args.cv_folds}.npz"
    if path.is_file() and not args.again:
        with np.load(path) as saved:
            return {k: (str(v) if k == "selected" else v) for k, v in saved.items()}
    split = replay_default(rows, cache, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **split)
    return split


def benign_floor_rule(split: dict[str, Any], cal: Any) -> dict[str, Any]:
    """The alternative rule tried for the "no malignant image called benign without referral"
    target: besides the conformal referral, refer every benign call whose malignant probability
    reaches the smallest one among the out-of-fold malignant images called benign (so that no
    out-of-fold miss would have gone unreferred). Its referral rate and unreferred misses."""

    from leukemia.calibration import scale

    oof, y_oof = scale(split["oof"], cal.temperature), split["y_oof"]
    missed = (y_oof != 0) & (oof.argmax(1) == 0)
    floor = float((1 - oof[missed, 0]).min()) if missed.any() else 1.0
    p, y = scale(split["test"], cal.temperature), split["y_test"]
    called_benign = p.argmax(1) == 0
    referred = (p.max(1) < 1 - cal.threshold) | (called_benign & (1 - p[:, 0] >= floor))
    return {
        "floor": floor,
        "referred": int(referred.sum()),
        "missed": int(((y != 0) & called_benign & ~referred).sum()),
    }


def measure(split: dict[str, Any], coverage: float) -> dict[str, Any]:
    """Calibration fitted on the out-of-fold probabilities, measured on the test split."""
    from leukemia.calibration import (
        Calibration,
        brier_score,
        expected_calibration_error,
        scale,
        set_metrics,
    )

    cal = Calibration.fit(split["oof"], split["y_oof"], coverage, "cv")
    raw, y = split["test"], split["y_test"]
    scaled = scale(raw, cal.temperature)
    sets = set_metrics(scaled, y, cal.threshold)
    return {
        "images": len(y),
        "T": cal.temperature,
        "q̂": cal.threshold,
        "ECE before": expected_calibration_error(raw, y),
        "ECE after": expected_calibration_error(scaled, y),
        "Brier before": brier_score(raw, y),
        "Brier after": brier_score(scaled, y),
        "coverage": sets["coverage"],
        "referral": sets["referral_rate"],
        "set size": sets["mean_set_size"],
        "sens. unreferred": sets["unreferred_malignant_sensitivity"],
        "spec. unreferred": sets["unreferred_benign_specificity"],
        "malignant→benign unreferred": int(sets["malignant_called_benign_unreferred"]),
        "errors": int((scaled.argmax(1) != y).sum()),
        **_floor_columns(benign_floor_rule(split, cal), len(y)),
        "_scaled": scaled,
        "_y": y,
        "_cal": cal,
    }


def _floor_columns(rule: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "benign floor": rule["floor"],
        "referral with floor": rule["referred"] / n,
        "missed with floor": rule["missed"],
        "_floor": rule,
    }


def pooled(results: list[dict[str, Any]], coverage: float) -> dict[str, Any]:
    """The resplits pooled: each split's own calibration, the test images counted together."""
    import numpy as np

    from leukemia.calibration import brier_score, expected_calibration_error, set_metrics

    scaled = np.concatenate([r["_scaled"] for r in results])
    y = np.concatenate([r["_y"] for r in results])
    referred, covered, missed, sizes = 0.0, 0.0, 0, 0.0
    for r in results:  # each split's sets with its own threshold
        m = set_metrics(r["_scaled"], r["_y"], r["_cal"].threshold)
        n = len(r["_y"])
        referred += m["referral_rate"] * n
        covered += m["coverage"] * n
        sizes += m["mean_set_size"] * n
        missed += int(m["malignant_called_benign_unreferred"])
    return {
        "split": f"pooled resplits ({len(results)})",
        "images": len(y),
        "ECE after": expected_calibration_error(scaled, y),
        "Brier after": brier_score(scaled, y),
        "coverage": covered / len(y),
        "referral": referred / len(y),
        "set size": sizes / len(y),
        "malignant→benign unreferred": missed,
        "errors": int((scaled.argmax(1) != y).sum()),
        "referral with floor": sum(r["_floor"]["referred"] for r in results) / len(y),
        "missed with floor": sum(r["_floor"]["missed"] for r in results),
    }


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--resplits", type=int, default=5, help="grouped resplits besides seed 0")
    parser.add_argument("--coverage", type=float, default=RUN_DEFAULTS.conformal_coverage)
    parser.add_argument("--cv-folds", type=int, default=RUN_DEFAULTS.cv_folds)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--extract", action="store_true", help="extract missing features (slow)")
    parser.add_argument("--again", action="store_true", help="refit, ignoring saved probabilities")
    args = parse_real_data_args(parser)

    from leukemia.dataset import make_split, read_split
    from leukemia.features import cache_dir_for, extract_features, resolve_precision
    from leukemia.model import ModelConfig

    work = OUT / "quality"  # bench/quality.py's splits and feature cache
    splits = [make_split(args.data, work / "splits", seed=s) for s in range(args.resplits + 1)]
    model_cfg = ModelConfig(input_size=224, weights=str(args.weights))
    precision = resolve_precision(args.precision)
    cache = cache_dir_for(work / "features", model_cfg, precision)
    if args.extract:
        rows0 = read_split(splits[0].path)
        extract_features(
            [args.data / r["path"] for r in rows0],
            [r["sha256"] for r in rows0],
            model_cfg,
            work / "features",
            precision=args.precision,
        )
    print(
        f"{machine()}\nfeatures {Path(cache).name} ({precision}); default grid "
        f"{list(RUN_DEFAULTS.optimizers)} × {list(RUN_DEFAULTS.batch_sizes)} × "
        f"{list(RUN_DEFAULTS.variants)} × {list(RUN_DEFAULTS.heads)}, {args.cv_folds}-fold CV, "
        f"coverage {args.coverage}\n",
        flush=True,
    )
    results = []
    for seed, info in enumerate(splits):
        started = time.perf_counter()
        split = cached_replay(seed, read_split(info.path), cache, args)
        row = {"split": f"seed {seed}", **measure(split, args.coverage)}
        results.append(row)
        print(
            f"  seed {seed}: {split['selected']} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    columns = [c for c in results[0] if not c.startswith("_")]
    print("\n" + table(results, columns))
    if len(results) > 1:
        print("\n" + table([pooled(results[1:], args.coverage)]))


if __name__ == "__main__":
    main()
