"""The driver of one configuration's training: load its features, cross-validate, fit, evaluate, log.

`train_run` is one grid configuration as one MLflow run (kind `training`): the head fitted on the
train split with early stopping on val, k-fold cross-validation over train + val when
`cv_folds` > 1, the head calibrated on held-out probabilities (`calibrate`), validation and test
metrics of the calibrated head. `refit_run` trains the configuration selection picked
(`selection.best_run`) again on train + val, as a run of its own (kind `refit`) that can be
registered, with the selected run's calibration. `train_folder` does split → extract → `train_run` on a local folder (CLI, benchmarks,
tests). Fitting itself is `training` (no MLflow); what a run logs and how is `tracking`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from leukemia.training import TrainConfig
from leukemia.watch import training_run_tags

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one configuration produced (small: fits in XCom)."""

    run_id: str
    head_uri: str  # runs:/<run id>/head/head.keras (`tracking.HEAD_ARTIFACT`)
    mlflow_url: str
    config: dict[str, Any]  # `TrainConfig.to_dict()`
    val: dict[str, float]  # `evaluation.evaluate` metrics of the validation split (refit: none)
    test: dict[str, float]  # and of the test split
    epochs_run: int
    seconds: float
    best_epoch: int = 0  # the epoch early stopping kept (the refit's epoch count comes from it)
    cv: dict[str, float] = field(default_factory=dict)  # cv_<metric>_mean/_std (k > 1)
    images: int = 0  # images the head was trained on
    refit_of: str = ""  # for a refit run: the selected run it trained again


def train_val_arrays(
    data: dict[str, tuple[Any, Any, list[dict[str, str]]]],
) -> tuple[Any, Any, list[str]]:
    """Features, labels and content hashes of train + val together (from `split_arrays`)."""
    import numpy as np

    x = np.concatenate([data["train"][0], data["val"][0]])
    y = np.concatenate([data["train"][1], data["val"][1]])
    return x, y, [r["sha256"] for r in (*data["train"][2], *data["val"][2])]


def train_val_copies(copies: dict[str, Any]) -> Any:
    """The augmented copies of train + val together, in `train_val_arrays`' order (c, n, width)."""
    import numpy as np

    return np.concatenate([copies["train"], copies["val"]], axis=1)


def cross_validation(
    cfg: TrainConfig, data: dict[str, Any], copies: dict[str, Any] | None = None
) -> tuple[dict[str, float], Any | None]:
    """k-fold CV of the configuration over train + val, logged to the active run
    (`tracking.log_cross_validation`); returns `cv_<metric>_mean` / `_std` and the out-of-fold
    probabilities (rows in `train_val_arrays`' order), ({}, None) when train + val are too small
    for two folds. `copies` (`training.copy_arrays`): augmented copies, added to the training
    folds only."""
    from leukemia.tracking import log_cross_validation, log_values
    from leukemia.training import cross_validate, usable_folds

    x, y, shas = train_val_arrays(data)
    k = usable_folds(y, shas, cfg.cv_folds)
    log_values(params={"cv_folds_used": k})
    if k < 2:
        log.warning(
            "%s: no class has two distinct images in train + val, too few for "
            "cross-validation: selection uses the validation split",
            cfg.name,
        )
        return {}, None
    if k < cfg.cv_folds:
        log.warning(
            "%s: %d-fold cross-validation, not %d: no class has more distinct images in train + val",
            cfg.name,
            k,
            cfg.cv_folds,
        )
    cv = cross_validate(cfg, x, y, shas, k, train_val_copies(copies) if copies else None)
    return log_cross_validation(cv, shas), cv["oof"]


def calibrate(
    cfg: TrainConfig, head: Any, data: dict[str, Any], oof: Any | None
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Fit the run's calibration (`calibration.Calibration.fit`) on held-out probabilities: the
    out-of-fold ones of cross-validation over train + val when it ran, else the validation split's;
    log it (`tracking.log_calibration`) and return the calibrated head with the `evaluation.evaluate`
    results of its val and test probabilities (the argmax is the uncalibrated head's)."""
    from leukemia import tracking
    from leukemia.calibration import Calibration, calibrated_head
    from leukemia.evaluation import evaluate

    if oof is not None:
        held_out, source = (oof, train_val_arrays(data)[1]), "cv"
    else:
        held_out, source = (head.predict(data["val"][0], verbose=0), data["val"][1]), "val"
    cal = Calibration.fit(*held_out, cfg.conformal_coverage, source)
    head = calibrated_head(head, cal.temperature)
    probs = {s: head.predict(data[s][0], verbose=0) for s in ("val", "test")}
    tracking.log_calibration(cal, (probs["test"], data["test"][1]), held_out)
    log.info(
        "%s: temperature %.3f, %s ECE %.3f → %.3f, conformal threshold %.3f at coverage %g",
        cfg.name,
        cal.temperature,
        source,
        cal.ece_before,
        cal.ece_after,
        cal.threshold,
        cal.coverage,
    )
    return head, {s: evaluate(data[s][1], p) for s, p in probs.items()}


def inherit_calibration(selected: Any, head: Any, test: tuple[Any, Any]) -> tuple[Any, Any]:
    """The refit's head with the calibration of the run it refits (its `calibration_*` tags: the
    refit has no held-out images to fit one), logged as that run's; returns the head and the
    `evaluation.evaluate` result of the test split `(features, labels)`. A run trained before
    calibration leaves the refit uncalibrated (one warning)."""
    from leukemia import tracking
    from leukemia.calibration import Calibration, calibrated_head
    from leukemia.evaluation import evaluate

    cal = Calibration.from_tags(selected.data.tags)
    if cal is None:
        log.warning(
            "Run %s has no calibration (trained before calibration): its refit is not calibrated "
            "and scoring refers no image by its prediction set; train the grid again to calibrate",
            selected.info.run_id,
        )
        return head, evaluate(test[1], head.predict(test[0], verbose=0))
    head = calibrated_head(head, cal.temperature)
    probs = head.predict(test[0], verbose=0)
    tracking.log_calibration(cal, (probs, test[1]))
    return head, evaluate(test[1], probs)


def features_config(cfg: TrainConfig, cache_dir: str | Path) -> TrainConfig:
    """`cfg` with the backend of the features in `cache_dir` (`features.backend_of`): a run logs
    the trunk its head is trained on, which is what scoring serves it on, whatever was asked."""
    from leukemia.features import backend_of

    return replace(cfg, model=replace(cfg.model, backend=backend_of(cache_dir)))


def log_int8_agreement(
    cfg: TrainConfig, head: Any, cache_dir: str | Path, test: tuple[Any, Any, list[dict[str, str]]]
) -> dict[str, float]:
    """For a run on int8 features: how far its head's test answers move between the float32 Keras
    features of the test images (`features.reference_dir`) and the int8 ones it is evaluated on
    (`backends.agreement`), logged to the active run as `int8_test_argmax_agreement` and
    `int8_test_max_probability_difference`; {} for a run on Keras features."""
    from leukemia import tracking
    from leukemia.backends import INT8, agreement
    from leukemia.features import load_features, reference_dir

    if cfg.model.backend != INT8:
        return {}
    x, _, rows = test
    shas = [r["sha256"] for r in rows]
    reference = load_features(reference_dir(cache_dir, cfg.model), shas, cfg.model.variant)
    found = agreement(head, reference, x)
    metrics = {
        f"int8_test_{k}": float(found[k])
        for k in ("argmax_agreement", "max_probability_difference")
    }
    tracking.log_values(metrics=metrics)
    log.info(
        "%s: int8 vs float32 trunk on %d test images: same class for %.1f %%, probabilities "
        "within %.4f",
        cfg.name,
        found["images"],
        100 * found["argmax_agreement"],
        found["max_probability_difference"],
    )
    return metrics


def _run_name(cfg: TrainConfig) -> str:
    return cfg.name.replace(" · ", "-")


def _loaded(cfg: TrainConfig, split_path: str | Path, cache_dir: str | Path) -> tuple[Any, ...]:
    """(cfg with its features' backend, split rows, `split_arrays`, `copy_arrays`) of a run."""
    from leukemia.dataset import read_split
    from leukemia.training import copy_arrays, split_arrays

    cfg = features_config(cfg, cache_dir)
    rows = read_split(split_path)
    data = split_arrays(rows, cache_dir, cfg.model.variant)
    return cfg, rows, data, copy_arrays(data, cache_dir, cfg.model.variant, cfg.augment_copies)


@dataclass
class _Inputs:
    """What the rest of a run needs after its cross-validation (`_finish`)."""

    cfg: TrainConfig
    rows: list[dict[str, str]]
    data: dict[str, Any]
    copies: dict[str, Any]
    split_path: str | Path
    images_dir: str | Path
    cache_dir: str | Path
    dataset_digest: str
    started: float


def _finish(run: Any, inputs: _Inputs, cv: dict[str, float], oof: Any | None) -> TrainResult:
    """The rest of a training run once its cross-validation is done: the head fitted on train
    (early stopping on val), calibrated on the out-of-fold probabilities (else val's), evaluated
    and logged to the active run `run`."""
    from leukemia import tracking
    from leukemia.training import best_epoch, fit_head, with_copies

    cfg, data = inputs.cfg, inputs.data
    head, history = fit_head(
        cfg,
        *with_copies(*data["train"][:2], inputs.copies["train"]),
        *data["val"][:2],
        on_epoch=tracking.log_epoch,
    )
    epochs_run, kept = len(history.get("loss", [])), best_epoch(history)
    tracking.log_values(metrics={"best_epoch": kept})
    head, results = calibrate(cfg, head, data, oof)
    log_int8_agreement(cfg, head, inputs.cache_dir, data["test"])
    head_uri = tracking.log_outcome(
        cfg, head, history, results, inputs.rows, inputs.images_dir, inputs.split_path,
        epochs_run, inputs.dataset_digest,
    )  # fmt: skip
    result = TrainResult(
        run_id=run.info.run_id,
        head_uri=head_uri,
        mlflow_url=tracking.run_url(run.info.experiment_id, run.info.run_id),
        config=cfg.to_dict(),
        val=results["val"]["metrics"],
        test=results["test"]["metrics"],
        epochs_run=epochs_run,
        seconds=round(time.monotonic() - inputs.started, 2),
        best_epoch=kept,
        cv=cv,
        images=len(data["train"][1]),
    )
    log.info(
        "%s: val F1 %.3f, CV F1 %s, test accuracy %.3f (%d epochs, %.0fs), run %s",
        cfg.name,
        result.val["f1_macro"],
        f"{cv['cv_f1_macro_mean']:.3f}" if cv else "-",
        result.test["accuracy"],
        epochs_run,
        result.seconds,
        result.run_id,
    )
    return result


def _run_tags(cache_dir: str | Path, dataset_digest: str, tags: dict[str, str] | None) -> dict:
    return {
        "dataset_digest": dataset_digest,
        **training_run_tags(cache_dir, "train"),  # registration fits its drift reference from them
        **(tags or {}),
    }


def train_run(
    cfg: TrainConfig,
    split_path: str | Path,
    images_dir: str | Path,
    cache_dir: str | Path,
    tags: dict[str, str] | None = None,
    dataset_digest: str = "",
) -> TrainResult:
    """Train, evaluate and log one configuration as one MLflow run; the run ends FAILED on error."""
    from leukemia import tracking

    started = time.monotonic()
    cfg, rows, data, copies = _loaded(cfg, split_path, cache_dir)
    inputs = _Inputs(
        cfg, rows, data, copies, split_path, images_dir, cache_dir, dataset_digest, started
    )
    run_tags = _run_tags(cache_dir, dataset_digest, tags)
    with tracking.training_run(tracking.RunKind.TRAINING, _run_name(cfg), run_tags) as run:
        tracking.log_config(cfg, dataset_digest)
        cv, oof = cross_validation(cfg, data, copies) if cfg.cv_folds > 1 else ({}, None)
        return _finish(run, inputs, cv, oof)


def train_round(
    cfg: TrainConfig,
    split_path: str | Path,
    images_dir: str | Path,
    cache_dir: str | Path,
    number: int = 1,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    dataset_digest: str = "",
) -> dict[str, Any]:
    """Round `number` of one configuration under successive halving (`halving`): round 1 starts
    its run, a later one resumes `run_id`. Fits the round's folds and logs them with the score so
    far; the last round (all k folds done) finishes the run as `train_run` does and returns its
    `TrainResult` dict, an earlier one `{run_id, mlflow_url (the UI's link), config, round,
    halving_f1_macro, seconds}`."""
    import mlflow

    from leukemia import halving, tracking

    started = time.monotonic()
    cfg, rows, data, copies = _loaded(cfg, split_path, cache_dir)
    inputs = _Inputs(
        cfg, rows, data, copies, split_path, images_dir, cache_dir, dataset_digest, started
    )
    x, y, shas = train_val_arrays(data)
    k = _usable_folds(cfg, y, shas)
    plan = halving.rounds(k, True)
    this = plan[number - 1]
    if number == 1:
        context = tracking.training_run(
            tracking.RunKind.TRAINING, _run_name(cfg), _run_tags(cache_dir, dataset_digest, tags)
        )
    else:
        context = tracking.resumed_run(str(run_id))
    with context as run:
        if number == 1:
            tracking.log_config(cfg, dataset_digest)
            tracking.log_values(params={"cv_folds_used": k, "halving": True})
            mlflow.set_tag("config", json.dumps(cfg.to_dict(), sort_keys=True))
        if not this.folds:  # too few images for two folds: the single validation split
            return asdict(_finish(run, inputs, {}, None))
        f1 = _fit_round(cfg, run.info.run_id, this, k, (x, y, shas), copies)
        if not this.final:
            return {
                "run_id": run.info.run_id,
                "mlflow_url": tracking.run_url(run.info.experiment_id, run.info.run_id),
                "config": cfg.to_dict(),
                "round": number,
                "halving_f1_macro": f1,
                "seconds": round(time.monotonic() - started, 2),
            }
        cv, oof = _all_folds(run.info.run_id, k, shas)
        return asdict(_finish(run, inputs, cv, oof))


def _usable_folds(cfg: TrainConfig, y: Any, shas: list[str]) -> int:
    from leukemia.training import usable_folds

    return usable_folds(y, shas, cfg.cv_folds) if cfg.cv_folds > 1 else 1


def _fit_round(
    cfg: TrainConfig,
    run_id: str,
    this: Any,
    k: int,
    arrays: tuple[Any, Any, list[str]],
    copies: Any,
) -> float:
    """Fit and log one round's folds (of k) on the active run (metrics, out-of-fold rows, the
    score of every fold so far); returns that score's macro-F1."""
    import numpy as np

    from leukemia import halving, tracking
    from leukemia.training import cross_validate

    x, y, shas = arrays
    cv = cross_validate(
        cfg, x, y, shas, k, train_val_copies(copies) if copies else None, only=this.folds
    )
    tracking.log_folds(cv["folds"])
    held = np.asarray(cv["held_out"])
    tracking.log_fold_probabilities(held, cv["oof"][held], this.first, this.stop)
    f1, loss = halving.score(tracking.get_run(run_id).data.metrics, this.stop)
    tracking.log_values(metrics={halving.SCORE_METRIC: f1, halving.LOSS_METRIC: loss})
    tracking.tag_run(run_id, {halving.ROUND_TAG: str(this.number)})
    log.info(
        "%s: round %d, folds %d-%d of %d: CV macro-F1 %.4f, log-loss %.4f so far",
        cfg.name, this.number, this.first + 1, this.stop, k, f1, loss,
    )  # fmt: skip
    return f1


def _all_folds(run_id: str, k: int, shas: list[str]) -> tuple[dict[str, float], Any]:
    """A halving run's k folds, from what its rounds logged, as `cross_validation` returns them
    (means and standard deviations logged, the whole out-of-fold table as `OOF_ARTIFACT`)."""
    from leukemia import tracking
    from leukemia.config import CLASSES
    from leukemia.training import fold_summary

    folds = tracking.logged_folds(tracking.get_run(run_id).data.metrics, k)
    oof = tracking.merged_fold_probabilities(run_id, len(shas), len(CLASSES))
    cv = {"folds": folds, "oof": oof, **fold_summary(folds)}
    return tracking.log_cross_validation(cv, shas), oof


#: Whether the refit scales the epoch count early stopping found by (refit images / images of the
#: fits that found it: 5/4 after 5-fold CV, about 1.23 after the 70/15 split). Scaled: on 5 grouped
#: resplits of the real images (bench/quality.py, RESULTS.md) the mlp grid's refit made fewer test
#: errors scaled than with the same epoch count, with CV selection (29 against 35 of 1,731) and
#: without (32 against 34); the default grid, which picked a linear head in every split, made 30
#: scaled against 27 unscaled: mixed evidence within a few images, so the rule stays one rule.
REFIT_SCALES_EPOCHS = True


def refit_epochs(
    metrics: dict[str, float],
    fit_images: float,
    refit_images: int,
    scaled: bool = REFIT_SCALES_EPOCHS,
) -> int:
    """Epochs of the refit: the mean epoch the CV folds kept when the run was cross-validated (less
    noisy than one split), else the epoch the single split kept; times refit/fit images if `scaled`."""
    found = metrics.get("cv_best_epoch_mean") or metrics.get("best_epoch")
    if not found:
        raise ValueError("the selected run has no best_epoch metric: train it again to refit it")
    factor = refit_images / fit_images if scaled and fit_images else 1.0
    return max(1, round(found * factor))


def _refit_config(selected: Any, n_train: int, n_refit: int, scaled: bool) -> TrainConfig:
    """The selected run's configuration with the refit's epoch count (`refit_epochs`) and no CV."""
    cfg = TrainConfig.from_dict(json.loads(selected.data.tags["config"]))
    k = int(selected.data.params.get("cv_folds_used", cfg.cv_folds))
    cross_validated = "cv_best_epoch_mean" in selected.data.metrics
    fit_images = n_refit * (k - 1) / k if cross_validated else n_train
    epochs = refit_epochs(selected.data.metrics, fit_images, n_refit, scaled)
    return replace(cfg, epochs=epochs, cv_folds=1)


def refit_run(
    selected_run_id: str,
    split_path: str | Path,
    images_dir: str | Path,
    cache_dir: str | Path,
    tags: dict[str, str] | None = None,
    scaled: bool = REFIT_SCALES_EPOCHS,
) -> TrainResult:
    """Train the selected run's configuration again on train + val and log it as a run of its own.

    No validation split is left, so it trains the epoch count early stopping found, scaled to the
    larger set (`refit_epochs`), and keeps the last weights; it is evaluated on the test split. The
    run is of kind `refit` (so it never competes in selection), tagged `refit` true and `refit_of`
    the selected run, and holds the same head, config and split tags as a training run, so
    `tracking.log_full_model` registers it. Its head carries the selected run's calibration
    (`inherit_calibration`).
    """
    from leukemia import tracking
    from leukemia.dataset import read_split
    from leukemia.training import copy_arrays, fit_head, split_arrays, with_copies

    started = time.monotonic()
    tracking.setup()
    selected = tracking.get_run(selected_run_id)
    variant = TrainConfig.from_dict(json.loads(selected.data.tags["config"])).model.variant
    rows = read_split(split_path)
    data = split_arrays(rows, cache_dir, variant)
    x, y, _ = train_val_arrays(data)
    cfg = features_config(_refit_config(selected, len(data["train"][1]), len(y), scaled), cache_dir)
    copies = train_val_copies(copy_arrays(data, cache_dir, variant, cfg.augment_copies))
    digest = selected.data.tags.get("dataset_digest", "")
    run_tags = {
        "refit": "true",
        tracking.REFIT_OF_TAG: selected_run_id,
        "dataset_digest": digest,
        **training_run_tags(cache_dir, "train+val"),
        **(tags or {}),
    }
    name = _run_name(cfg) + "-refit"
    with tracking.training_run(tracking.RunKind.REFIT, name, run_tags) as run:
        tracking.log_config(cfg, digest)
        tracking.log_values(params={"refit_of": selected_run_id, "train_images": len(y)})
        head, history = fit_head(
            cfg,
            *with_copies(x, y, copies),
            None,
            None,
            on_epoch=tracking.log_epoch,
        )
        head, test = inherit_calibration(selected, head, data["test"][:2])
        log_int8_agreement(cfg, head, cache_dir, data["test"])
        head_uri = tracking.log_outcome(
            cfg, head, history, {"test": test}, rows, images_dir, split_path, cfg.epochs, digest
        )
    result = TrainResult(
        run_id=run.info.run_id,
        head_uri=head_uri,
        mlflow_url=tracking.run_url(run.info.experiment_id, run.info.run_id),
        config=cfg.to_dict(),
        val={},
        test=test["metrics"],
        epochs_run=cfg.epochs,
        seconds=round(time.monotonic() - started, 2),
        best_epoch=cfg.epochs,
        images=len(y),
        refit_of=selected_run_id,
    )
    log.info(
        "%s refit on %d train + val images for %d epochs: test accuracy %.3f, run %s (of %s)",
        cfg.name,
        len(y),
        cfg.epochs,
        result.test["accuracy"],
        result.run_id,
        selected_run_id,
    )
    return result


def train_folder(
    images_dir: str | Path,
    cfg: TrainConfig,
    workdir: str | Path,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    precision: str = "auto",
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Split → extract (with `cfg.augment_copies` copies of the train and val images, on
    `cfg.model.backend`) → train one configuration on a local `<Class>/<name>` folder (no Airflow).

    For the CLI, benchmarks and tests; returns the split info, extraction and training results.
    """
    from leukemia.dataset import make_split, read_split, training_shas
    from leukemia.features import extract_features

    images_dir, workdir = Path(images_dir), Path(workdir)
    info = make_split(images_dir, workdir / "splits", fractions=fractions)
    rows = read_split(info.path)
    extracted = extract_features(
        [images_dir / r["path"] for r in rows],
        [r["sha256"] for r in rows],
        cfg.model,
        workdir / "features",
        precision=precision,
        augment=training_shas(rows),
        copies=cfg.augment_copies,
        reference=[r["sha256"] for r in rows if r["split"] == "test"],
    )
    result = train_run(
        cfg, info.path, images_dir, extracted.cache_dir, tags=tags, dataset_digest=info.digest
    )
    return {"split": info, "features": extracted, "result": result, "rows": rows}
