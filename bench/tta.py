"""Test-time augmentation on real images: do the errors, and the malignant smears called benign,
change class under the augmented copies the extraction caches (issue 24's last target, issue 27's
limit)?

Per split (the project's split, seed 0, and `--resplits` grouped resplits): one head of the default
grid's most often selected configuration (adam · batch 64 · multiscale · linear, bench/quality.py)
fitted on train + val + their `--copies` augmented copies for `--epochs` epochs (the scaled refit's
typical length), then applied to each test image and to its copies (`augment.py`: stain jitter,
background patches, lighting; the copies training uses, in bench/quality.py's cache: every image's,
computed when missing). Printed per split and pooled:

- errors of the image alone, and of the mean of its probabilities and its copies' (TTA);
- "unstable": the images whose copies' predicted class differs from the image's (a referral
  rule), how many errors they hold;
- the malignant images called benign, how many of them are unstable, and their p(Benign).

    python bench/tta.py [--resplits 5] [--copies 2] [--epochs 24]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, parse_real_data_args, real_data_parser, table  # noqa: E402


def split_row(rows: list[dict[str, str]], cache: str, args: Any) -> dict[str, Any]:
    """One split's head, its test predictions with and without the copies, and the counts."""
    import numpy as np

    from leukemia.config import CLASSES
    from leukemia.features import load_copies
    from leukemia.model import ModelConfig
    from leukemia.training import TrainConfig, copy_arrays, fit_head, split_arrays, with_copies

    data = split_arrays(rows, cache, "multiscale")
    copies = copy_arrays(data, cache, "multiscale", args.copies)
    x = np.concatenate([data["train"][0], data["val"][0]])
    y = np.concatenate([data["train"][1], data["val"][1]])
    train_copies = np.concatenate([copies["train"], copies["val"]], axis=1)
    cfg = TrainConfig(
        optimizer="adam",
        batch_size=64,
        epochs=args.epochs,
        cv_folds=1,
        augment_copies=args.copies,
        model=ModelConfig(224, str(args.weights), variant="multiscale", head="linear"),
    )
    head, _ = fit_head(cfg, *with_copies(x, y, train_copies), None, None)
    test_x, test_y, test_rows = data["test"]
    shas = [r["sha256"] for r in test_rows]
    alone = np.asarray(head(test_x, training=False))
    views = [
        np.asarray(head(c, training=False))
        for c in load_copies(cache, shas, "multiscale", args.copies)
    ]
    pred = alone.argmax(1)
    unstable = np.zeros(len(test_y), bool)
    for view in views:
        unstable |= view.argmax(1) != pred
    mean = (alone + sum(views)) / (1 + len(views))
    benign = CLASSES.index("Benign")
    missed = (test_y != benign) & (pred == benign)
    return {
        "images": len(test_y),
        "errors": int((pred != test_y).sum()),
        "errors (TTA mean)": int((mean.argmax(1) != test_y).sum()),
        "unstable": int(unstable.sum()),
        "unstable rate": float(unstable.mean()),
        "errors unstable": int((unstable & (pred != test_y)).sum()),
        "malignant→benign": int(missed.sum()),
        "of them unstable": int((missed & unstable).sum()),
        "their p(Benign)": " ".join(f"{p:.3f}" for p in sorted(alone[missed, benign])) or "-",
    }


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--resplits", type=int, default=5, help="grouped resplits besides seed 0")
    parser.add_argument("--copies", type=int, default=2, help="augmented copies per image")
    parser.add_argument("--epochs", type=int, default=24, help="the refit's epochs")
    parser.add_argument("--precision", default="auto", help="the feature cache's precision")
    args = parse_real_data_args(parser)

    from leukemia.dataset import make_split, read_split
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig

    work = OUT / "quality"
    splits = [make_split(args.data, work / "splits", seed=s) for s in range(args.resplits + 1)]
    shas = sorted({r["sha256"]: r for r in read_split(splits[0].path)}.items())
    cache = extract_features(  # every image and its copies: nothing to do once cached
        [args.data / r["path"] for _, r in shas],
        [sha for sha, _ in shas],
        ModelConfig(224, str(args.weights)),
        work / "features",
        precision=args.precision,
        augment=[sha for sha, _ in shas],
        copies=args.copies,
    ).cache_dir
    print(f"{machine()}\nfeatures: {cache}\n", flush=True)
    out = []
    for info in splits:
        seed = len(out)
        rows = read_split(info.path)
        out.append({"split": f"seed {seed}", **split_row(rows, cache, args)})
        print(table(out[-1:]), flush=True)
    pooled: dict[str, Any] = {"split": f"pooled ({len(out)} splits)"}
    for key in out[0]:
        if key not in ("split", "unstable rate", "their p(Benign)"):
            pooled[key] = sum(r[key] for r in out)
    pooled["unstable rate"] = pooled["unstable"] / pooled["images"]
    pooled["their p(Benign)"] = "-"
    print(f"\n{table(out + [pooled])}")


if __name__ == "__main__":
    main()
