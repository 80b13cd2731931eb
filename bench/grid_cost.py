"""What the training grid costs on the real images: the grid before issue 16 against the default grid
(cross-validated selection, two heads, refit of the winner, and since issue 17 two augmented copies
of each train and val image), side by side in one run.

Both grids run on the same cached frozen features of ../shared/data/leukemia-dev (224 px, overlay
masked, offline weights; bench/quality.py's cache, extracted here if missing) and the same split.
Each configuration is timed the way a training task computes it: the train→val fit, its predictions,
and, with CV, the k fold fits; then one refit of the selected configuration on train + val. The
extraction every grid needs first is timed on a sample of images and scaled to the data set (and to
the augmented copies of the train and val images a grid asks for; the copies themselves come from
the cache `bench/shortcuts.py` fills, extracted here if missing), so that the last column is the
whole run's compute, the part the grid's settings change and the part they do not.

`--seeds`: the splits to run on, 0 the project split, 1-5 the grouped resplits of
bench/quality.py (the copies of each split's train and val images are extracted as needed); with
more than one, a pooled table per grid follows (test errors summed over the splits, and how often
each grid selected the same configuration as the first grid).

`default` has successive halving on (the training DAG's default since issue 26);
`default-full-grid` is the same with `halving` off, every configuration on every fold.

    python bench/grid_cost.py [--sample 48] [--grids before,default] [--seeds 0]
    python bench/grid_cost.py --grids default-full-grid,default --seeds 0,1,2,3,4,5
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, parse_real_data_args, real_data_parser, table  # noqa: E402


def grids() -> dict[str, dict]:
    """The grids compared: before issue 16, today's defaults (successive halving on since issue 26)
    and today's defaults with one thing changed."""
    from leukemia.config import RUN_DEFAULTS

    default = {
        "variants": list(RUN_DEFAULTS.variants),
        "heads": list(RUN_DEFAULTS.heads),
        "cv_folds": RUN_DEFAULTS.cv_folds,
        "refit": RUN_DEFAULTS.refit,
        "augment_copies": RUN_DEFAULTS.augment_copies,
        "halving": RUN_DEFAULTS.halving,
    }
    return {
        "before": {
            "variants": ["seed", "multiscale"],
            "heads": ["mlp"],
            "cv_folds": 1,
            "refit": False,
            "augment_copies": 0,
        },
        "default": default,
        "default-full-grid": {**default, "halving": False},
        "default-without-augmentation": {**default, "augment_copies": 0},
        "default-both-variants": {**default, "variants": ["seed", "multiscale"]},
    }


def scored_config(cfg, data: dict, copies: dict, cv: dict | None = None) -> tuple[tuple, int]:  # noqa: ANN001
    """A configuration as its training task scores it: the train→val fit, then its k-fold CV (or
    `cv`, the folds successive halving fitted in rounds); the `run_grid` entry and the fits made."""
    from leukemia.evaluation import evaluate
    from leukemia.runs import train_val_arrays, train_val_copies
    from leukemia.training import best_epoch, cross_validate, fit_head, with_copies

    train = with_copies(*data["train"][:2], copies["train"])
    head, history = fit_head(cfg, *train, *data["val"][:2])
    fits = 1
    val = evaluate(data["val"][1], head.predict(data["val"][0], verbose=0))["metrics"]
    score = (val["f1_macro"], -val["log_loss"])
    fit_images, epoch = len(data["train"][1]), best_epoch(history)
    if cfg.cv_folds > 1:
        x, y, groups = train_val_arrays(data)
        if cv is None:
            cv = cross_validate(cfg, x, y, groups, copies=train_val_copies(copies))
            fits += cfg.cv_folds
        score = (cv["f1_macro_mean"], -cv["log_loss_mean"])
        fit_images, epoch = len(y) * (cfg.cv_folds - 1) / cfg.cv_folds, cv["best_epoch_mean"]
    return (score, cfg, data, copies, fit_images, epoch, head), fits


def halving_grid(name: str, configs: list, rows: list, cache_dir: str, started: float) -> tuple:  # noqa: ANN001
    """The grid under successive halving as the training DAG runs it (`leukemia.halving`): each
    round fits its folds of the configurations still in, the best third goes on; the finalists
    are scored as `scored_config` does, on the folds their rounds fitted."""
    from leukemia import halving
    from leukemia.runs import train_val_arrays, train_val_copies
    from leukemia.training import copy_arrays, cross_validate, fold_summary, split_arrays

    arrays, folds, fits = {}, {}, 0
    alive = list(configs)
    for this in halving.rounds(configs[0].cv_folds, True):
        for cfg in alive:
            if cfg.model.variant not in arrays:
                data = split_arrays(rows, cache_dir, cfg.model.variant)
                arrays[cfg.model.variant] = (
                    data,
                    copy_arrays(data, cache_dir, cfg.model.variant, cfg.augment_copies),
                )
            data, copies = arrays[cfg.model.variant]
            x, y, groups = train_val_arrays(data)
            cv = cross_validate(cfg, x, y, groups, copies=train_val_copies(copies), only=this.folds)
            folds.setdefault(cfg.name, []).extend(cv["folds"])
            fits += len(this.folds)
            print(
                f"  {name}: round {this.number} {cfg.name} {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        if not this.final:
            ranked = sorted(alive, key=lambda c: halving.rank_key(folds[c.name]))
            alive = ranked[: halving.survivors(len(ranked))]
            print(
                f"  {name}: after round {this.number}: " + ", ".join(c.name for c in alive),
                flush=True,
            )
    scored = []
    for cfg in alive:
        data, copies = arrays[cfg.model.variant]
        entry, n = scored_config(cfg, data, copies, fold_summary(folds[cfg.name]))
        scored.append(entry)
        fits += n
    return scored, fits


def run_grid(name: str, spec: dict, rows: list, cache_dir: str) -> dict:  # noqa: ANN001
    """Train every configuration of one grid as the training tasks do; time it."""
    from leukemia.config import RUN_DEFAULTS
    from leukemia.evaluation import evaluate
    from leukemia.runs import refit_epochs, train_val_arrays, train_val_copies
    from leukemia.training import (
        TrainConfig,
        copy_arrays,
        fit_head,
        grid,
        split_arrays,
        with_copies,
    )

    base = TrainConfig(cv_folds=spec["cv_folds"], augment_copies=spec["augment_copies"])
    configs = grid(
        list(RUN_DEFAULTS.optimizers),
        list(RUN_DEFAULTS.batch_sizes),
        spec["variants"],
        base,
        spec["heads"],
    )
    started = time.perf_counter()
    if spec.get("halving"):
        scored, fits = halving_grid(name, configs, rows, cache_dir, started)
    else:
        scored, fits = [], 0
        for cfg in configs:
            data = split_arrays(rows, cache_dir, cfg.model.variant)
            copies = copy_arrays(data, cache_dir, cfg.model.variant, cfg.augment_copies)
            entry, n = scored_config(cfg, data, copies)
            scored.append(entry)
            fits += n
            print(f"  {name}: {cfg.name} {time.perf_counter() - started:.0f} s", flush=True)
    grid_s = time.perf_counter() - started
    score, cfg, data, copies, fit_images, epoch, head = max(scored, key=lambda s: s[0])
    refit_s = 0.0
    if spec["refit"]:
        t = time.perf_counter()
        x, y, _ = train_val_arrays(data)
        epochs = refit_epochs({"best_epoch": epoch}, fit_images, len(y))
        x, y = with_copies(x, y, train_val_copies(copies))
        head, _ = fit_head(replace(cfg, epochs=epochs, cv_folds=1), x, y, None, None)
        fits += 1
        refit_s = time.perf_counter() - t
    probabilities = head.predict(data["test"][0], verbose=0)
    test = evaluate(data["test"][1], probabilities)["metrics"]
    errors = int((probabilities.argmax(axis=1) != data["test"][1]).sum())
    return {
        "grid": name,
        "augmented copies": spec["augment_copies"],
        "configurations": len(configs),
        "head fits": fits,
        "grid s": grid_s,
        "refit s": refit_s,
        "selected": cfg.name,
        "test acc": test["accuracy"],
        "test errors": f"{errors} / {len(data['test'][1])}",
        "malignant sens.": test["malignant_sensitivity"],
    }


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument(
        "--sample", type=int, default=48, help="images timed for the extraction rate"
    )
    parser.add_argument(
        "--grids", default="before,default", help="comma-separated: " + ", ".join(grids())
    )
    parser.add_argument(
        "--seeds", default="0", help="comma-separated split seeds (0: the project split)"
    )
    args = parse_real_data_args(parser)

    from leukemia.dataset import make_split, read_split, training_shas
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig

    work = OUT / "quality"  # bench/quality.py's split and feature cache
    model_cfg = ModelConfig(input_size=224, weights=str(args.weights))
    copies = max(spec["augment_copies"] for spec in grids().values())
    seeds = [int(seed) for seed in args.seeds.split(",")]
    splits = {
        seed: read_split(make_split(args.data, work / "splits", seed=seed).path) for seed in seeds
    }
    rows = splits[seeds[0]]
    paths = [args.data / r["path"] for r in rows]
    shas = [r["sha256"] for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        sample = extract_features(
            paths[: args.sample], shas[: args.sample], model_cfg, tmp, precision="auto"
        )
        per_image = (time.perf_counter() - t) / max(sample.computed, 1)
    extraction_s = per_image * len(set(shas))
    print(
        f"{machine()}\n{len(rows)} images ({len(set(shas))} distinct); extraction ({sample.precision}) "
        f"{1 / per_image:.2f} images/s on {sample.computed} images → {extraction_s:.0f} s for the data set\n"
    )
    results = []
    specs = grids()
    for seed, split_rows in splits.items():
        train_val = training_shas(split_rows)
        ex = extract_features(
            paths, shas, model_cfg, work / "features", "auto", augment=train_val, copies=copies
        )
        on_split = [
            {"split": seed, **run_grid(name, specs[name], split_rows, ex.cache_dir)}
            for name in args.grids.split(",")
        ]
        before = next((r for r in on_split if r["grid"] == "before"), on_split[0])
        for r in on_split:
            # the copies are extracted as the originals are: the same images/s
            r["extraction s"] = extraction_s * (
                1 + r["augmented copies"] * len(set(train_val)) / len(set(shas))
            )
            r["total s"] = r["extraction s"] + r["grid s"] + r["refit s"]
            r["training × before"] = (r["grid s"] + r["refit s"]) / (
                before["grid s"] + before["refit s"]
            )
            r["total × before"] = r["total s"] / before["total s"]
        results += on_split
        print(f"\nSplit seed {seed} done:\n{table(on_split)}\n", flush=True)
    print("\nTraining compute of each grid (one process; the DAG spreads it over its workers):")
    print(table(results))
    if len(splits) > 1:
        print(f"\nPooled over split seeds {args.seeds}:")
        print(table(pooled(results, args.grids.split(","))))


def pooled(results: list[dict], names: list[str]) -> list[dict]:
    """Per grid: head fits, training seconds and test errors summed over the splits, the mean
    malignant sensitivity, the training time against the first grid's, and on how many splits it
    selected the first grid's configuration."""
    first = [r for r in results if r["grid"] == names[0]]
    out = []
    for name in names:
        mine = [r for r in results if r["grid"] == name]
        errors = [tuple(map(int, r["test errors"].split(" / "))) for r in mine]
        training = sum(r["grid s"] + r["refit s"] for r in mine)
        out.append(
            {
                "grid": name,
                "splits": len(mine),
                "head fits": sum(r["head fits"] for r in mine),
                "training s": training,
                f"training × {names[0]}": training / sum(r["grid s"] + r["refit s"] for r in first),
                "test errors": f"{sum(e for e, _ in errors)} / {sum(n for _, n in errors)}",
                "per split": ", ".join(str(e) for e, _ in errors),
                f"same selection as {names[0]}": sum(
                    a["selected"] == b["selected"] for a, b in zip(mine, first, strict=True)
                ),
                "malignant sens. (mean)": sum(r["malignant sens."] for r in mine) / len(mine),
            }
        )
    return out


if __name__ == "__main__":
    main()
