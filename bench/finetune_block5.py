"""Fine-tuning VGG16's block 5 from cached block-4 activations against the frozen default (issue 27).

All of ../shared/data/leukemia-dev, the offline VGG16 weights, 224 px, overlay masked, the
extraction precision `--precision` (auto: bfloat16 on this CPU), `--copies` augmented copies (the
default 2). Side by side in one run:

1. **Cost of caching the activations.** A sample of `--cost-images` images (with their copies) is
   extracted into fresh folders without and with activations, alternately, `--cost-repeats` times:
   images/s, peak RSS and bytes per image of each (`features.extract_features`).
2. **The cache.** Every image (and the copies of the train and val images; of every image with
   `--resplits`) extracted once with activations into `bench/out/finetune_block5/features`; a
   later run reuses it (its wall time is printed when it was computed in this run).
3. **Per split** (the project's split, seed 0; then `--resplits` grouped resplits, seeds 1-N):
   the frozen default: the default grid (`--optimizers` × batch 64 × multiscale × mlp and linear,
   each fitted on train + copies with early stopping on val, `--cv-folds`-fold CV over train + val,
   selection by CV, refit on train + val + copies with scaled epochs: what the pipeline registers);
   the fine-tuned: block 5 and the selected configuration's train-only head (the run
   `finetune.fine_tune_candidate` fine-tunes) trained on the cached activations
   (`finetune.tune_activations`, each `--ft-precisions`), its load, per-epoch and total wall time and
   peak RSS; and `pipeline`: what the DAG with `fine_tune` on registers (the fine-tuned model when
   its validation macro-F1 beats its source's, else the frozen default).
4. Test errors, accuracy, malignant sensitivity and benign specificity with bootstrap 95 %
   intervals (`quality.with_intervals`); on the project's split, the shortcut audit
   (`audit.audit_model`, `--audit` images; 0: none) of the frozen default and the fine-tuned model.

    python bench/finetune_block5.py [--ft-epochs 10] [--ft-lr 1e-6] [--resplits 0] [--audit 200]
    python bench/finetune_block5.py --ft-epochs 1 --ft-precisions bfloat16 float32 --audit 0
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, parse_real_data_args, real_data_parser, table  # noqa: E402
from quality import METRICS, with_intervals  # noqa: E402

from leukemia.config import RUN_DEFAULTS  # noqa: E402

WORK = OUT / "finetune_block5"
SIZE = 224
#: The shortcut audit's numbers the bench prints (`audit.AuditResult.metrics`).
AUDIT_COLUMNS = (
    "chance",
    "overlay_region_accuracy",
    "background_region_accuracy",
    "corner_swap_changed",
    "background_swap_changed",
    "background_swap_to_donor",
    "overlay_heat_share",
)


class PeakRss:
    """This process's resident memory at the start of a block and its peak during it (MB),
    sampled every 20 ms."""

    def __init__(self) -> None:
        self.start_mb = self.peak_mb = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def rss_mb() -> float:
    """Resident memory of this process now (MB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def folder_bytes(folder: str | Path, activations: bool) -> int:
    """Bytes of a cache folder's activation files, or of its feature files (copies included)."""
    from leukemia.features import ACTIVATION_LAYER

    files = [p for p in Path(folder).rglob("*.npz")]
    return sum(
        p.stat().st_size for p in files if (p.parent.name == ACTIVATION_LAYER) == activations
    )


def _extract_sample(
    args: Any, sample: list[dict[str, str]], root: Path, activations: bool
) -> dict[str, float]:
    """One extraction of the sample and its copies into `root` (run in a fresh process: its peak
    RSS is the extraction's alone); rows, seconds, peak RSS and bytes per row."""
    import resource

    from leukemia.features import extract_features
    from leukemia.model import ModelConfig

    shas = [r["sha256"] for r in sample]
    start = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = start.ru_utime + start.ru_stime
    out = extract_features(
        [args.data / r["path"] for r in sample],
        shas,
        ModelConfig(SIZE, str(args.weights)),
        root,
        precision=args.precision,
        augment=shas,
        copies=args.copies,
        activations=activations,
    )
    n = out.computed + out.augmented
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rows": n,
        "seconds": out.seconds,  # the extraction's, without building the extractor
        "cpu": usage.ru_utime + usage.ru_stime - cpu_before,  # the process's, all threads
        "rss": usage.ru_maxrss / 1024,
        "features": folder_bytes(out.cache_dir, False) / n,
        "activations": folder_bytes(out.cache_dir, True) / n,
    }


def caching_cost(args: Any, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Extraction of a sample (and its copies) without and with activations, alternately, each in
    a fresh process."""
    import multiprocessing

    sample = rows[:: max(1, len(rows) // args.cost_images)][: args.cost_images]
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    spawn = multiprocessing.get_context("spawn")
    for repeat in range(args.cost_repeats):
        for activations in (False, True) if repeat % 2 == 0 else (True, False):
            root = WORK / "cost" / f"{activations}-{repeat}"
            shutil.rmtree(root, ignore_errors=True)
            with spawn.Pool(1) as pool:
                done = pool.apply(_extract_sample, (args, sample, root, activations))
            runs[activations].append(done)
            shutil.rmtree(root, ignore_errors=True)
    out = []
    for activations, done in runs.items():
        n = sum(d["rows"] for d in done)
        out.append(
            {
                "extraction": "features + block-4 activations"
                if activations
                else "features (today)",
                "rows": f"{n} ({len(done)} × {done[0]['rows']})",
                "images/s": n / sum(d["seconds"] for d in done),
                "s/image": sum(d["seconds"] for d in done) / n,
                "CPU s/image": sum(d["cpu"] for d in done) / n,
                "peak RSS MB": max(d["rss"] for d in done),
                "features KB/image": done[0]["features"] / 1024,
                "activations KB/image": done[0]["activations"] / 1024,
            }
        )
    return out


def extract_all(args: Any, rows: list[dict[str, str]], augment: list[str]) -> dict[str, Any]:
    """Every image (copies of `augment`) with activations, into the bench's cache; cost if computed."""
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig

    with PeakRss() as mem:
        started = time.perf_counter()
        out = extract_features(
            [args.data / r["path"] for r in rows],
            [r["sha256"] for r in rows],
            ModelConfig(SIZE, str(args.weights)),
            WORK / "features",
            precision=args.precision,
            augment=augment,
            copies=args.copies,
            activations=True,
        )
        seconds = time.perf_counter() - started
    return {
        "cache_dir": out.cache_dir,
        "all_rows": out.images + len(set(augment)) * args.copies,
        "rows": out.computed + out.augmented,
        "seconds": seconds,
        "rss": mem.peak_mb - mem.start_mb,
        "feature_bytes": folder_bytes(out.cache_dir, False),
        "activation_bytes": folder_bytes(out.cache_dir, True),
    }


def frozen_default(rows: list[dict[str, str]], cache_dir: str, args: Any) -> dict[str, Any]:
    """The default grid on cached features with copies, CV selection and the scaled refit: the
    refit's test predictions, and the selected configuration with its train-only head."""
    import numpy as np

    from leukemia.evaluation import evaluate
    from leukemia.model import ModelConfig
    from leukemia.runs import refit_epochs, train_val_arrays, train_val_copies
    from leukemia.training import (
        TrainConfig,
        copy_arrays,
        cross_validate,
        fit_head,
        grid,
        split_arrays,
        with_copies,
    )

    started = time.perf_counter()
    data = split_arrays(rows, cache_dir, "multiscale")
    copies = copy_arrays(data, cache_dir, "multiscale", args.copies)
    x, y, shas = train_val_arrays(data)
    base = TrainConfig(
        cv_folds=args.cv_folds,
        augment_copies=args.copies,
        model=ModelConfig(SIZE, str(args.weights), variant="multiscale"),
    )
    fitted = []
    for cfg in grid(args.optimizers, [64], ["multiscale"], base, ["mlp", "linear"]):
        head, _ = fit_head(cfg, *with_copies(*data["train"][:2], copies["train"]), *data["val"][:2])
        val = evaluate(data["val"][1], np.asarray(head(data["val"][0], training=False)))
        cv = cross_validate(cfg, x, y, shas, copies=train_val_copies(copies))
        key = (cv["f1_macro_mean"], -cv["log_loss_mean"])
        fitted.append(
            {
                "cfg": cfg,
                "head": head,
                "val_f1": val["metrics"]["f1_macro"],
                "val_loss": val["metrics"]["log_loss"],
                "key": key,
                "cv_epoch": cv["best_epoch_mean"],
            }
        )
        print(f"    {cfg.name}: CV F1 {key[0]:.4f}, val F1 {fitted[-1]['val_f1']:.4f}", flush=True)
    best = max(fitted, key=lambda f: f["key"])
    fit_images = len(y) * (args.cv_folds - 1) / args.cv_folds
    epochs = refit_epochs({"cv_best_epoch_mean": best["cv_epoch"]}, fit_images, len(y))
    refit, _ = fit_head(
        replace(best["cfg"], epochs=epochs, cv_folds=1),
        *with_copies(x, y, train_val_copies(copies)),
        None,
        None,
    )
    test_x, test_y = data["test"][:2]
    return {
        "cfg": best["cfg"],
        "head": best["head"],
        "refit": refit,
        "label": f"{best['cfg'].name} → refit {epochs} ep",
        "val_f1": best["val_f1"],
        "val_loss": best["val_loss"],
        "y": test_y,
        "default_pred": np.asarray(refit(test_x, training=False)).argmax(1),
        "source_pred": np.asarray(best["head"](test_x, training=False)).argmax(1),
        "seconds": time.perf_counter() - started,
    }


def print_epoch(epoch: int, logs: dict[str, float]) -> None:
    """One line per fine-tuning epoch, so that a long run shows where it is."""
    print(
        f"      epoch {epoch + 1}: loss {logs['loss']:.4f}, val cross-entropy "
        f"{logs['val_cross_entropy']:.4f}, val accuracy {logs['val_accuracy']:.4f} "
        f"({logs['epoch_seconds']:.0f} s)",
        flush=True,
    )


def fine_tuned(
    frozen: dict[str, Any],
    rows: list[dict[str, str]],
    cache_dir: str,
    args: Any,
    precision: str,
    load: Callable[[], dict[str, Any]] | None = None,
    blocks: int = 1,
) -> dict[str, Any]:
    """Block 5 (`blocks` 2: blocks 4-5) and the selected train-only head trained on the cached
    activations (`load()`'s, by default `finetune.load_activation_splits`'): wall times, peak RSS,
    validation macro-F1 and test predictions."""
    import keras
    import numpy as np

    from leukemia.evaluation import evaluate
    from leukemia.features import resolve_precision
    from leukemia.finetune import FineTuneConfig, load_activation_splits, tune_activations

    with tempfile.TemporaryDirectory() as tmp:  # a fresh copy of the head for every run
        frozen["head"].save(Path(tmp) / "head.keras")
        head = keras.saving.load_model(Path(tmp) / "head.keras", safe_mode=True)
    cfg = frozen["cfg"]
    ft = FineTuneConfig(
        learning_rate=args.ft_lr,
        epochs=args.ft_epochs,
        patience=args.ft_patience,
        batch_size=args.ft_batch_size,
        precision=precision,
    )
    with PeakRss() as mem:
        started = time.perf_counter()
        data = load() if load else load_activation_splits(cfg, rows, cache_dir)
        load_s = time.perf_counter() - started
        tuned = tune_activations(cfg, head, data, ft, on_epoch=print_epoch, blocks=blocks)
        total_s = time.perf_counter() - started
    del data
    val = evaluate(
        tuned.data["val"][1], np.asarray(tuned.head.predict(tuned.data["val"][0], verbose=0))
    )
    test_prob = np.asarray(tuned.head.predict(tuned.data["test"][0], verbose=0))
    return {
        "tuned": tuned,
        "precision": resolve_precision(precision),  # auto: what it resolved to
        "val_f1": val["metrics"]["f1_macro"],
        "pred": test_prob.argmax(1),
        "load_s": load_s,
        "epoch_s": tuned.epoch_seconds,
        "total_s": total_s,
        "rss": mem.peak_mb - mem.start_mb,
        "val_ce": tuned.history.get("val_cross_entropy", []),
        "outcome": {
            "val_f1_macro": val["metrics"]["f1_macro"],
            "val_cross_entropy": tuned.val_best,
            "source_val_f1_macro": frozen["val_f1"],
            "source_val_cross_entropy": tuned.val_start,
        },
    }


def audit_rows(
    frozen: dict[str, Any],
    tuned: dict[str, Any],
    rows: list[dict[str, str]],
    args: Any,
    label: str = "fine-tuned block 5",
) -> list[dict[str, Any]]:
    """The shortcut audit of the frozen default and the fine-tuned model (pixels-to-softmax)."""
    from leukemia.audit import AuditConfig, audit_model
    from leukemia.model import assemble, build_trunk

    cfg = frozen["cfg"].model
    models = {
        "frozen default": assemble(cfg, build_trunk(cfg), frozen["refit"]),
        label: assemble(cfg, tuned["tuned"].trunk, tuned["tuned"].head),
    }
    out = []
    for name, model in models.items():
        result = audit_model(model, rows, args.data, True, AuditConfig(images=args.audit))
        kept = {k: round(result.metrics[k], 4) for k in AUDIT_COLUMNS if k in result.metrics}
        out.append({"model": name, **kept, "warnings": len(result.warnings)})
        out[-1]["seconds"] = round(sum(result.seconds.values()), 1)
    return out


def evaluate_split(rows: list[dict[str, str]], cache_dir: str, args: Any) -> dict[str, Any]:
    """The frozen default and the fine-tuned model(s) on one split; `pipeline`: the fine-tuned
    model when it beats its source on validation (`finetune.fine_tune_wins`), else the default."""
    from leukemia.finetune import fine_tune_wins

    frozen = frozen_default(rows, cache_dir, args)
    print(f"    frozen default: {frozen['label']} ({frozen['seconds']:.0f} s)", flush=True)
    tuned = [fine_tuned(frozen, rows, cache_dir, args, p) for p in args.ft_precisions]
    for t in tuned:
        print(
            f"    fine-tuned ({t['precision']}): {len(t['epoch_s'])} epochs, "
            f"{sum(t['epoch_s']) / len(t['epoch_s']):.0f} s/epoch, val F1 {t['val_f1']:.4f} "
            f"(source {frozen['val_f1']:.4f}), val cross-entropy "
            f"{[round(v, 4) for v in t['val_ce']]} (before: {t['outcome']['source_val_cross_entropy']:.4f}; "
            f"the source on its float32 features: {frozen['val_loss']:.4f})",
            flush=True,
        )
    chosen = fine_tune_wins(tuned[0]["outcome"])
    preds = {
        "frozen default (refit)": frozen["default_pred"],
        "frozen train-only head (the source)": frozen["source_pred"],
        **{f"fine-tuned block 5 ({t['precision']})": t["pred"] for t in tuned},
        "pipeline with fine_tune on": tuned[0]["pred"] if chosen else frozen["default_pred"],
    }
    return {"frozen": frozen, "tuned": tuned, "preds": preds, "y": frozen["y"], "chosen": chosen}


def quality_table(results: list[dict[str, Any]], resamples: int) -> str:
    """Test metrics with bootstrap intervals, the splits' test images pooled."""
    import numpy as np

    y = np.concatenate([r["y"] for r in results])
    out = []
    for name in results[0]["preds"]:
        pred = np.concatenate([r["preds"][name] for r in results])
        out.append({"model": name, **with_intervals(y, pred, resamples)})
    return table(out, ["model", "errors", *METRICS])


def cost_table(tuned: list[dict[str, Any]], blocks: str = "block 5") -> str:
    """Fine-tuning's wall time and memory (`fine_tuned`'s results)."""
    out = []
    for t in tuned:
        epochs = t["epoch_s"]
        out.append(
            {
                "fine-tuning": f"{blocks} + head, {t['precision']}",
                "load activations s": t["load_s"],
                "epochs": len(epochs),
                "s/epoch (mean)": sum(epochs) / len(epochs),
                "total s (load + train + val/test features)": t["total_s"],
                "peak RSS +MB": t["rss"],
            }
        )
    return table(out)


def add_arguments(parser: Any, epochs: int, patience: int, resplits: int, audit: int) -> None:
    """The options this bench shares with bench/finetune_blocks45.py, with its defaults."""
    parser.add_argument("--precision", default="auto", help="extraction precision")
    parser.add_argument("--copies", type=int, default=2, help="augmented copies per image")
    parser.add_argument("--cost-images", type=int, default=64)
    parser.add_argument("--cost-repeats", type=int, default=2, help="0: no cost measurement")
    parser.add_argument("--resplits", type=int, default=resplits, help="resplits besides seed 0")
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--optimizers", nargs="+", default=["adam", "sgd", "rmsprop"])
    parser.add_argument("--ft-lr", type=float, default=RUN_DEFAULTS.fine_tune_learning_rate)
    parser.add_argument("--ft-epochs", type=int, default=epochs)
    parser.add_argument("--ft-patience", type=int, default=patience)
    parser.add_argument("--ft-batch-size", type=int, default=32)
    parser.add_argument("--audit", type=int, default=audit, help="audit images (0: no audit)")
    parser.add_argument("--bootstrap", type=int, default=1000)


def main() -> None:
    parser = real_data_parser(__doc__)
    add_arguments(parser, RUN_DEFAULTS.fine_tune_epochs, RUN_DEFAULTS.patience, 0, 200)
    parser.add_argument("--cost-only", action="store_true", help="stop after the caching cost")
    parser.add_argument("--ft-precisions", nargs="+", default=["auto"])
    args = parse_real_data_args(parser)

    from leukemia.dataset import make_split, read_split, training_shas

    splits = [make_split(args.data, WORK / "splits", seed=s) for s in range(args.resplits + 1)]
    rows0 = read_split(splits[0].path)
    print(f"{machine()}\n{len(rows0)} images; project split {splits[0].counts}\n", flush=True)
    cost = caching_cost(args, rows0) if args.cost_repeats else []
    if cost:
        print("Extraction of a sample with its copies, without and with activations:")
        print(table(cost), flush=True)
    if args.cost_only:
        return
    augment = [r["sha256"] for r in rows0] if args.resplits else training_shas(rows0)
    extraction = extract_all(args, rows0, augment)
    print(
        f"\nCache {extraction['cache_dir']}: features {extraction['feature_bytes'] / 2**20:.0f} MB, "
        f"activations {extraction['activation_bytes'] / 2**20:.0f} MB; computed now: "
        f"{extraction['rows']} rows in {extraction['seconds']:.0f} s "
        f"(peak RSS +{extraction['rss']:.0f} MB)\n",
        flush=True,
    )
    results = []
    for seed, info in enumerate(splits):
        print(f"  split seed {seed}:", flush=True)
        results.append(evaluate_split(read_split(info.path), extraction["cache_dir"], args))
        if seed == 0:
            print("\nProject split (seed 0), test images:")
            print(quality_table(results, args.bootstrap))
            print("\nCost of the fine-tuning (project split):")
            print(cost_table(results[0]["tuned"]), flush=True)
            today = extraction["all_rows"] / cost[0]["images/s"] if cost else float("nan")
            print(
                f"Today's extraction of the same {extraction['all_rows']} rows (images and copies) "
                f"at the sample's features-only rate: {today:.0f} s; fine-tuning stage "
                f"({results[0]['tuned'][0]['precision']}): {results[0]['tuned'][0]['total_s']:.0f} s",
                flush=True,
            )
            if args.audit:
                print("\nShortcut audit (project split):")
                print(table(audit_rows(results[0]["frozen"], results[0]["tuned"][0], rows0, args)))
    if args.resplits:
        print(f"\n{args.resplits} grouped resplits (seeds 1-{args.resplits}), test images pooled:")
        print(quality_table(results[1:], args.bootstrap))
    print(
        "\nPer split: frozen selection; fine-tuned chosen by validation macro-F1, then cross-entropy:"
    )
    print(
        table(
            [
                {
                    "seed": i,
                    "frozen default": r["frozen"]["label"],
                    "source val F1": r["frozen"]["val_f1"],
                    "fine-tuned val F1": r["tuned"][0]["val_f1"],
                    "val cross-entropy before → after": (
                        f"{r['tuned'][0]['outcome']['source_val_cross_entropy']:.4f} → "
                        f"{r['tuned'][0]['outcome']['val_cross_entropy']:.4f}"
                    ),
                    "fine-tuned chosen": r["chosen"],
                }
                for i, r in enumerate(results)
            ]
        )
    )


if __name__ == "__main__":
    main()
