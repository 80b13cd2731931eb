"""Fine-tuning against the frozen-trunk head it starts from, on the project's split of real images.

Trains one configuration the pipeline's way (split, cached features, head), then fine-tunes it from
pixels (`finetune.fine_tune_run`: the last VGG16 block(s) unfrozen, Adam at a low learning rate,
flips and rotations, early stopping on validation loss) and prints both on the test split with their
wall times and the device. Meant for a machine with a GPU: on CPU each fine-tuning epoch runs VGG16
forward and its top block backward on every training image.

    python bench/finetune.py                                  # ../shared's images and weights
    python bench/finetune.py --data DIR --weights none --size 48 --ft-epochs 1   # a smoke run
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, parse_real_data_args, real_data_parser, table  # noqa: E402

COLUMNS = (
    "model",
    "epochs",
    "seconds",
    "val_f1_macro",
    "test_accuracy",
    "test_f1_macro",
    "test_errors",
    "test_malignant_sensitivity",
    "test_benign_specificity",
)


def device() -> str:
    """The GPU that ran it, or 'CPU only'."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU only"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"{len(gpus)} x {details.get('device_name', 'GPU')}"


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--size", type=int, default=224, help="input size (px)")
    parser.add_argument("--optimizer", default="rmsprop", help="the head's optimizer")
    parser.add_argument("--batch-size", type=int, default=64, help="the head's batch size")
    parser.add_argument("--variant", default="multiscale", choices=("seed", "multiscale"))
    parser.add_argument("--epochs", type=int, default=30, help="the head's max epochs")
    parser.add_argument("--blocks", type=int, default=1, help="VGG16 blocks unfrozen (1: block5)")
    parser.add_argument("--lr", type=float, default=1e-5, help="fine-tuning learning rate")
    parser.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning max epochs")
    parser.add_argument("--ft-batch-size", type=int, default=32)
    parser.add_argument("--keep", action="store_true", help="keep bench/out/finetune")
    args = parse_real_data_args(parser)

    work = OUT / "finetune"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["LEUKEMIA_DATA_DIR"] = str(work / "data")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"

    import mlflow

    from leukemia.finetune import FineTuneConfig, fine_tune_run
    from leukemia.model import ModelConfig
    from leukemia.runs import train_folder
    from leukemia.training import TrainConfig

    cfg = TrainConfig(
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        epochs=args.epochs,
        model=ModelConfig(args.size, args.weights, variant=args.variant),
    )
    started = time.monotonic()
    done = train_folder(args.data, cfg, work)
    head_seconds = time.monotonic() - started
    source, info = done["result"], done["split"]
    n_test = sum(1 for r in done["rows"] if r["split"] == "test")
    ft = FineTuneConfig(
        blocks=args.blocks,
        learning_rate=args.lr,
        epochs=args.ft_epochs,
        batch_size=args.ft_batch_size,
    )
    outcome = fine_tune_run(source.run_id, info.path, args.data, ft)
    tuned = mlflow.get_run(outcome["run_id"]).data.metrics

    def row(name: str, epochs: int, seconds: float, val: float, test: dict) -> dict:
        return {
            "model": name,
            "epochs": epochs,
            "seconds": round(seconds, 1),
            "val_f1_macro": val,
            "test_accuracy": test["accuracy"],
            "test_f1_macro": test["f1_macro"],
            "test_errors": round((1 - test["accuracy"]) * n_test),
            "test_malignant_sensitivity": test["malignant_sensitivity"],
            "test_benign_specificity": test["benign_specificity"],
        }

    rows = [
        row(
            f"head on frozen features ({cfg.name}; extraction included)",
            source.epochs_run,
            head_seconds,
            source.val["f1_macro"],
            source.test,
        ),
        row(
            f"fine-tuned {','.join(ft.unfrozen)} (lr {ft.learning_rate:g}, bs{ft.batch_size})",
            outcome["epochs_run"],
            outcome["seconds"],
            outcome["val_f1_macro"],
            {k.removeprefix("test_"): v for k, v in tuned.items() if k.startswith("test_")},
        ),
    ]
    print(f"{machine()}; {device()}")
    print(f"{args.data}: {len(done['rows'])} images, test split {n_test}, {args.size} px\n")
    print(table(rows, COLUMNS))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
