"""Fine-tuning VGG16's blocks 4-5 from cached block-3 activations against the frozen default
(issue 27's next step: block 5 alone did not reach the target, bench/finetune_block5.py).

All of ../shared/data/leukemia-dev, the offline VGG16 weights, 224 px, overlay masked, the
extraction precision `--precision` (auto: bfloat16 on this CPU), `--copies` augmented copies.
Side by side in one run:

1. **Cost of caching the activations.** A sample of `--cost-images` images goes through the
   pipeline's extractor without and with a `block3_pool` output (28 x 28 x 256 at 224 px),
   alternately, `--cost-repeats` times (`features.compute_part`, in this process): images/s.
2. **The cache.** Every image and its copies once through the extractor with the `block3_pool`
   output, stored as float16 arrays in `bench/out/finetune_blocks45/` (keyed like the feature cache:
   `features.cache_dir_for`); a later run reuses them. The frozen features come from
   bench/quality.py's cache (computed when missing).
3. **Per split** (the project's split, seed 0; then `--resplits` grouped resplits, seeds 1-N): the
   frozen default exactly as bench/finetune_block5.py fits it (the default grid, CV selection, the
   scaled refit), and blocks 4-5 with the selected configuration's train-only head trained on the
   cached activations (`finetune.tune_activations(blocks=2)`, `--ft-precision`), Adam at
   `--ft-lr`, at most `--ft-epochs` epochs with patience `--ft-patience` (an epoch costs several
   times block 5's: the defaults are 5 and 2, not the pipeline's 10 and 5); `pipeline`: what the
   DAG with fine-tuning on would register (`finetune.fine_tune_wins`).
4. Test errors, accuracy, malignant sensitivity and benign specificity with bootstrap 95 %
   intervals, after every split (the pooled resplits so far); on the project split, the fine-tuning's
   wall time per epoch and in total, its peak RSS, and the shortcut audit (`--audit` images).

    python bench/finetune_blocks45.py [--resplits 5] [--ft-epochs 5] [--audit 100]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, parse_real_data_args, real_data_parser, table  # noqa: E402
from finetune_block5 import (  # noqa: E402
    PeakRss,
    add_arguments,
    audit_rows,
    cost_table,
    fine_tuned,
    frozen_default,
    quality_table,
)

WORK = OUT / "finetune_blocks45"
SIZE = 224
LAYER = "block3_pool"
LABEL = "fine-tuned blocks 4-5"


def shape() -> tuple[int, int, int]:
    """One image's `LAYER` output at `SIZE` px."""
    from leukemia.model import POOL_STRIDES, POOL_WIDTHS

    return SIZE // POOL_STRIDES[LAYER], SIZE // POOL_STRIDES[LAYER], POOL_WIDTHS[LAYER]


def activation_bytes() -> int:
    """Bytes of one image's cached `LAYER` output."""
    import numpy as np

    from leukemia.features import ACTIVATION_DTYPE

    return int(np.prod(shape())) * np.dtype(ACTIVATION_DTYPE).itemsize


def extractor(args: Any, activations: bool) -> Any:
    """The pipeline's extractor, with `LAYER`'s output second when `activations`."""
    from leukemia.features import resolve_precision
    from leukemia.model import ModelConfig, build_extractor

    cfg = ModelConfig(SIZE, str(args.weights))
    return build_extractor(cfg, resolve_precision(args.precision), activations, LAYER)


def caching_cost(args: Any, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """images/s of the extractor on a sample without and with the block-3 output, alternately."""
    from leukemia.features import compute_part

    sample = rows[:: max(1, len(rows) // args.cost_images)][: args.cost_images]
    source = {r["sha256"]: args.data / r["path"] for r in sample}
    shas = sorted(source)
    nets = {False: extractor(args, False), True: extractor(args, True)}
    for net in nets.values():  # warm-up: the first batch builds the graph
        compute_part(shas[:32], source, net, SIZE, 32)
    seconds = {False: 0.0, True: 0.0}
    for repeat in range(args.cost_repeats):
        for activations in (False, True) if repeat % 2 == 0 else (True, False):
            started = time.perf_counter()
            compute_part(shas, source, nets[activations], SIZE, 32)
            seconds[activations] += time.perf_counter() - started
    n = len(shas) * args.cost_repeats
    return [
        {
            "extraction": f"features + {LAYER} activations" if act else "features (today)",
            "images": n,
            "images/s": n / seconds[act],
            "s/image": seconds[act] / n,
            f"{LAYER} KB/image": activation_bytes() / 1024 if act else 0,
        }
        for act in (False, True)
    ]


def version_paths(args: Any, copies: int) -> list[Path]:
    """The cache's arrays: the originals, then each augmented copy."""
    from leukemia.features import cache_dir_for, resolve_precision
    from leukemia.model import ModelConfig

    cfg = ModelConfig(SIZE, str(args.weights))
    folder = Path(cache_dir_for(WORK / "activations", cfg, resolve_precision(args.precision)))
    return [folder / f"{LAYER}-original.npy"] + [
        folder / f"{LAYER}-copy-{c}.npy" for c in range(copies)
    ]


def extract_block3(args: Any, shas: list[str], source: dict[str, Path]) -> dict[str, Any]:
    """Every image's and copy's `LAYER` output (float16, rows in `shas` order), computed when the
    cache lacks it: the arrays (memory-mapped) and the cost when computed now."""
    import functools

    import numpy as np

    from leukemia.augment import augment_batch
    from leukemia.features import ACTIVATION_DTYPE, IMAGES_PER_SHARD, compute_part

    paths = version_paths(args, args.copies)
    index = paths[0].with_name("sha256.txt")
    cost = {"rows": 0, "seconds": 0.0, "rss": 0.0}
    if not (index.exists() and index.read_text().split() == shas and all(map(Path.exists, paths))):
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        net = extractor(args, True)
        with PeakRss() as mem:
            started = time.perf_counter()
            for v, path in enumerate(paths):
                transform = functools.partial(augment_batch, copy=v - 1) if v else None
                out = np.lib.format.open_memmap(path, "w+", ACTIVATION_DTYPE, (len(shas), *shape()))
                for first in range(0, len(shas), IMAGES_PER_SHARD):
                    part = shas[first : first + IMAGES_PER_SHARD]
                    _, acts = compute_part(part, source, net, SIZE, 32, transform)
                    out[first : first + len(part)] = acts
                    done = v * len(shas) + first + len(part)
                    rate = done / (time.perf_counter() - started)
                    print(
                        f"    {LAYER}: {done}/{len(paths) * len(shas)} rows, {rate:.1f}/s",
                        flush=True,
                    )
                out.flush()
                del out
            cost = {
                "rows": len(paths) * len(shas),
                "seconds": time.perf_counter() - started,
                "rss": mem.peak_mb - mem.start_mb,
            }
        index.write_text("\n".join(shas))
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    return {"arrays": arrays, "bytes": sum(p.stat().st_size for p in paths), **cost}


def split_loader(rows: list[dict[str, str]], cache: dict[str, Any], order: dict[str, int]) -> Any:
    """A loader of one split's activations in `finetune.load_activation_splits`' form."""
    import numpy as np

    from leukemia.features import labels_to_index

    def load() -> dict[str, tuple[list[dict[str, Any]], Any]]:
        out = {}
        for split in ("train", "val", "test"):
            part = [r for r in rows if r["split"] == split]
            idx = np.asarray([order[r["sha256"]] for r in part])
            versions = cache["arrays"] if split == "train" else cache["arrays"][:1]
            arrays = [{LAYER: np.ascontiguousarray(a[idx])} for a in versions]
            out[split] = (arrays, labels_to_index([r["label"] for r in part]))
        return out

    return load


def evaluate_split(
    rows: list[dict[str, str]], features: str, cache: dict[str, Any], order: dict, args: Any
) -> dict[str, Any]:
    """The frozen default and blocks 4-5 fine-tuned on one split; `pipeline`: the fine-tuned model
    when it beats its source on validation (`finetune.fine_tune_wins`), else the default."""
    from leukemia.finetune import fine_tune_wins

    frozen = frozen_default(rows, features, args)
    print(f"    frozen default: {frozen['label']} ({frozen['seconds']:.0f} s)", flush=True)
    load = split_loader(rows, cache, order)
    tuned = fine_tuned(frozen, rows, features, args, args.ft_precision, load=load, blocks=2)
    outcome = tuned["outcome"]
    print(
        f"    {LABEL}: {len(tuned['epoch_s'])} epochs, "
        f"{sum(tuned['epoch_s']) / len(tuned['epoch_s']):.0f} s/epoch, val F1 "
        f"{tuned['val_f1']:.4f} (source {frozen['val_f1']:.4f}), val cross-entropy "
        f"{outcome['source_val_cross_entropy']:.4f} → {outcome['val_cross_entropy']:.4f}",
        flush=True,
    )
    chosen = fine_tune_wins(outcome)
    preds = {
        "frozen default (refit)": frozen["default_pred"],
        "frozen train-only head (the source)": frozen["source_pred"],
        f"{LABEL} ({tuned['precision']})": tuned["pred"],
        "pipeline with fine-tuning on": tuned["pred"] if chosen else frozen["default_pred"],
    }
    return {"frozen": frozen, "tuned": tuned, "preds": preds, "y": frozen["y"], "chosen": chosen}


def project_report(result: dict[str, Any], cache: dict[str, Any], args: Any, rows: list) -> None:
    """The project split's cost of fine-tuning and, with `--audit`, the shortcut audit."""
    print("\nCost of the fine-tuning (project split):")
    print(cost_table([result["tuned"]], "blocks 4-5"), flush=True)
    if cache["seconds"]:
        print(
            f"The extraction that cached {cache['rows']} rows with {LAYER} took "
            f"{cache['seconds']:.0f} s ({cache['rows'] / cache['seconds']:.1f} rows/s, peak RSS "
            f"+{cache['rss']:.0f} MB)",
            flush=True,
        )
    if args.audit:
        print("\nShortcut audit (project split):")
        print(table(audit_rows(result["frozen"], result["tuned"], rows, args, LABEL)), flush=True)


def main() -> None:
    parser = real_data_parser(__doc__)
    add_arguments(parser, epochs=5, patience=2, resplits=5, audit=100)
    parser.add_argument("--ft-precision", default="auto")
    args = parse_real_data_args(parser)

    from leukemia.dataset import make_split, read_split
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig

    splits = [make_split(args.data, WORK / "splits", seed=s) for s in range(args.resplits + 1)]
    rows0 = read_split(splits[0].path)
    print(f"{machine()}\n{len(rows0)} images; project split {splits[0].counts}\n", flush=True)
    if args.cost_repeats:
        print("Extraction of a sample without and with the block-3 output:")
        print(table(caching_cost(args, rows0)), flush=True)
    source = {r["sha256"]: args.data / r["path"] for r in rows0}
    shas = sorted(source)
    features = extract_features(  # the frozen features: bench/quality.py's cache, reused
        [source[s] for s in shas],
        shas,
        ModelConfig(SIZE, str(args.weights)),
        OUT / "quality" / "features",
        precision=args.precision,
        augment=shas,
        copies=args.copies,
    ).cache_dir
    cache = extract_block3(args, shas, source)
    print(f"\n{LAYER} cache: {cache['bytes'] / 2**20:,.0f} MB for {len(shas)} images and copies\n")
    order = {sha: i for i, sha in enumerate(shas)}
    results = []
    for seed, info in enumerate(splits):
        print(f"  split seed {seed}:", flush=True)
        rows = read_split(info.path)
        results.append(evaluate_split(rows, features, cache, order, args))
        if seed == 0:
            print("\nProject split (seed 0), test images:")
            print(quality_table(results, args.bootstrap))
            project_report(results[0], cache, args, rows0)
        else:
            print(f"\nResplits 1-{seed}, test images pooled:")
            print(quality_table(results[1:], args.bootstrap), flush=True)
    print("\nPer split: frozen selection; fine-tuned chosen by validation macro-F1, then loss:")
    per_split = [
        {
            "seed": i,
            "frozen default": r["frozen"]["label"],
            "source val F1": r["frozen"]["val_f1"],
            "fine-tuned val F1": r["tuned"]["val_f1"],
            "val cross-entropy before → after": (
                f"{r['tuned']['outcome']['source_val_cross_entropy']:.4f} → "
                f"{r['tuned']['outcome']['val_cross_entropy']:.4f}"
            ),
            "epochs": len(r["tuned"]["epoch_s"]),
            "fine-tuned chosen": r["chosen"],
        }
        for i, r in enumerate(results)
    ]
    print(table(per_split))


if __name__ == "__main__":
    main()
