"""An optional ensemble of the grid's best heads: the mean of their softmax, as one model from pixels.

The top-k runs' heads (by validation macro-F1, ties to the lower log-loss: `selection.top_runs`,
`selection.best_run`'s order) are scored on held-out probabilities: out-of-fold ones where every
member logged them (`tracking.OOF_ARTIFACT`, cross-validation), else the validation split's; their
mean is chosen only when its macro-F1 beats the best single head's, a tie keeping the single head
(the simpler model). A chosen ensemble is logged as its own MLflow run (`tracking.RunKind.ENSEMBLE`,
its members' run ids in `tracking.ENSEMBLE_MEMBERS_TAG`), holding metrics but no model:
`tracking.log_full_model` builds the one-trunk, k-head model (`model.build_ensemble`) when a gate
registers it, as it does for any run.

Calibration: each member's head is calibrated by its own run (temperature scaling, `runs.calibrate`),
so members' out-of-fold probabilities are scaled by their temperatures before they are averaged,
as the model averages calibrated heads. The ensemble itself keeps temperature 1.0 (the mean of
calibrated softmaxes is not rescaled: no layer after `Average`); its conformal threshold is its own,
on the same held-out probabilities the choice was made on (`ensemble_calibration`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leukemia.config import RUN_DEFAULTS
from leukemia.model import ModelConfig, shared_trunk

log = logging.getLogger(__name__)

ENSEMBLE, SINGLE = "ensemble", "single"


def mean_probabilities(probs: Mapping[str, Any], members: Sequence[str]) -> Any:
    """The ensemble's output: the mean of the members' class probabilities."""
    import numpy as np

    return np.mean([np.asarray(probs[m], dtype="float64") for m in members], axis=0)


def choose(probs: Mapping[str, Any], y_true: Any, source: str = "val") -> dict[str, Any]:
    """Ensemble or best single head, from held-out probabilities of each member (rows aligned with
    `y_true`; `probs` in rank order, so an equal single score goes to the higher-ranked head).

    The ensemble (every member) is chosen only when its macro-F1 is strictly higher than the best
    single member's; `source` says whose probabilities these are (`val`, or `cv` for out-of-fold).
    """
    from leukemia.evaluation import evaluate

    members = list(probs)
    if not members:
        raise ValueError("no ensemble members to choose from")
    scores = {m: evaluate(y_true, probs[m])["metrics"]["f1_macro"] for m in members}
    best = max(members, key=lambda m: scores[m])  # max keeps the first of equal scores
    together = evaluate(y_true, mean_probabilities(probs, members))["metrics"]["f1_macro"]
    chosen = len(members) > 1 and together > scores[best]
    return {
        "choice": ENSEMBLE if chosen else SINGLE,
        "members": members,
        "best_single": best,
        "source": source,
        "single_f1_macro": round(scores[best], 6),
        "ensemble_f1_macro": round(together, 6),
        "member_f1_macro": {m: round(v, 6) for m, v in scores.items()},
    }


def member_probabilities(
    runs: Sequence[Mapping[str, Any]], rows: list[dict[str, str]], cache_dir: str | Path
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Labels and each member's probabilities per split, from its logged head and the cached features.

    Returns ({split: labels}, {split: {run id: probabilities}}) for the validation and test splits.
    """
    from leukemia.tracking import load_head
    from leukemia.training import split_arrays

    data: dict[str, Any] = {}
    labels: dict[str, Any] = {}
    probs: dict[str, dict[str, Any]] = {"val": {}, "test": {}}
    for run in runs:
        variant = run["config"]["variant"]
        if variant not in data:
            data[variant] = split_arrays(rows, cache_dir, variant)
        head = load_head(run["run_id"])
        for split in probs:
            x, labels[split], _ = data[variant][split]
            probs[split][run["run_id"]] = head.predict(x, verbose=0)
    return labels, probs


def oof_probabilities(
    runs: Sequence[Mapping[str, Any]], rows: list[dict[str, str]]
) -> tuple[Any, dict[str, Any]] | None:
    """Labels and each member's out-of-fold probabilities on the images they all scored, from
    their `OOF_ARTIFACT`s, scaled by the member's temperature (its head is calibrated); None when
    a member has none (no cross-validation: use validation)."""
    import numpy as np

    from leukemia.calibration import Calibration, scale
    from leukemia.features import labels_to_index
    from leukemia.tracking import OOF_ARTIFACT, artifact_names, download, get_run

    found: dict[str, dict[str, Any]] = {}
    for run in runs:
        folder, name = OOF_ARTIFACT.rsplit("/", 1)
        if name not in artifact_names(run["run_id"], folder):
            return None
        path = download(run["run_id"], OOF_ARTIFACT)
        cal = Calibration.from_tags(get_run(run["run_id"]).data.tags)
        with np.load(path) as arrays:
            probs = arrays["probabilities"]
            if cal is not None:
                probs = scale(probs, cal.temperature)
            found[run["run_id"]] = dict(zip(arrays["sha256"].tolist(), probs, strict=True))
    label = {r["sha256"]: r["label"] for r in rows}
    first = next(iter(found.values()))
    shared = [sha for sha in first if sha in label and all(sha in f for f in found.values())]
    if not shared:
        return None
    y = labels_to_index([label[sha] for sha in shared])
    return y, {m: np.stack([f[sha] for sha in shared]) for m, f in found.items()}


def ensemble_calibration(held_out: tuple[Any, Any], coverage: float, source: str) -> Any:
    """The ensemble's `calibration.Calibration`: temperature 1.0 (its members are calibrated),
    the conformal threshold of its mean probabilities on held-out images `(probabilities,
    labels)`, and their ECE and Brier score (the same before and after)."""
    from leukemia.calibration import (
        Calibration,
        brier_score,
        conformal_threshold,
        expected_calibration_error,
    )

    ece, brier = expected_calibration_error(*held_out), brier_score(*held_out)
    return Calibration(
        temperature=1.0,
        threshold=conformal_threshold(*held_out, coverage),
        coverage=coverage,
        images=len(held_out[1]),
        source=source,
        ece_before=ece,
        ece_after=ece,
        brier_before=brier,
        brier_after=brier,
    )


def log_ensemble_run(
    choice: dict[str, Any],
    runs: Sequence[Mapping[str, Any]],
    labels: Mapping[str, Any],
    probs: Mapping[str, Mapping[str, Any]],
    split_path: str | Path,
    dataset_digest: str = "",
    tags: dict[str, str] | None = None,
    held_out: tuple[Any, Any] | None = None,
) -> str:
    """An MLflow run for a chosen ensemble: its members, validation and test metrics, its
    calibration (`ensemble_calibration` on `held_out`, the (probabilities, labels) the choice was
    made on; None: the validation split's), no model yet."""

    from leukemia import tracking
    from leukemia.evaluation import evaluate

    members = choice["members"]
    mean = {s: mean_probabilities(probs[s], members) for s in ("val", "test")}
    results = {s: evaluate(labels[s], mean[s]) for s in ("val", "test")}
    coverage = float(runs[0]["config"].get("conformal_coverage", RUN_DEFAULTS.conformal_coverage))
    held_out = held_out or (mean["val"], labels["val"])
    cal = ensemble_calibration(held_out, coverage, choice["source"])
    run_tags = {
        "ensemble": "true",
        tracking.ENSEMBLE_MEMBERS_TAG: json.dumps(members),
        "dataset_digest": dataset_digest,
        "config": json.dumps(runs[0]["config"], sort_keys=True),
        "split_uri": str(split_path),
        **(tags or {}),
    }
    name = f"ensemble-top{len(members)}"
    with (
        tracking.training_run(tracking.RunKind.ENSEMBLE, name, run_tags) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        tracking.log_values(
            {
                "top_k": len(members),
                "members": ",".join(members),
                "member_configs": "; ".join(
                    f"{r['config']['optimizer']} · bs{r['config']['batch_size']} · "
                    f"{r['config']['variant']}"
                    for r in runs
                ),
                "selection_source": choice["source"],
            }
        )
        tracking.log_values(
            metrics={
                f"{choice['source']}_single_f1_macro": choice["single_f1_macro"],
                f"{choice['source']}_ensemble_f1_macro": choice["ensemble_f1_macro"],
            }
        )
        out = Path(tmp)
        tracking.log_results(results, out)
        (out / "ensemble.json").write_text(json.dumps(choice, indent=1))
        tracking.log_folder(out)
        tracking.log_calibration(cal, (mean["test"], labels["test"]), held_out)
    log.info(
        "Ensemble of %d heads: %s macro-F1 %.4f vs best single %.4f, run %s",
        len(members),
        choice["source"],
        choice["ensemble_f1_macro"],
        choice["single_f1_macro"],
        run.info.run_id,
    )
    return run.info.run_id


def select_ensemble(
    results: Sequence[Mapping[str, Any]],
    split_path: str | Path,
    cache_dir: str | Path,
    top_k: int,
    dataset_digest: str = "",
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Score the mean of the top-k heads on held-out probabilities (out-of-fold ones when every member
    logged `tracking.OOF_ARTIFACT`, else the validation split's); log an ensemble run only when it
    beats the best single head. Returns the choice (`choose`), with `run_id` when one was logged."""
    from leukemia.dataset import read_split
    from leukemia.selection import top_runs

    runs = top_runs(results, top_k)
    if len(runs) < 2:
        log.info(
            "Ensemble: %d finished configurations of top %d, nothing to average", len(runs), top_k
        )
        return {"choice": SINGLE, "members": [r["run_id"] for r in runs], "source": "val"}
    shared_trunk([ModelConfig(**_model_keys(r["config"])) for r in runs])
    rows = read_split(split_path)
    labels, probs = member_probabilities(runs, rows, cache_dir)
    oof = oof_probabilities(runs, rows)
    if oof is not None:
        choice = choose(oof[1], oof[0], source="cv")
        held_out = (mean_probabilities(oof[1], choice["members"]), oof[0])
    else:
        choice = choose(probs["val"], labels["val"], source="val")
        held_out = None  # the validation split's, as `log_ensemble_run` computes it
    log.info(
        "Ensemble of the top %d: %s macro-F1 %.4f vs best single head %.4f → %s",
        len(runs),
        choice["source"],
        choice["ensemble_f1_macro"],
        choice["single_f1_macro"],
        choice["choice"],
    )
    if choice["choice"] == ENSEMBLE:
        choice["run_id"] = log_ensemble_run(
            choice, runs, labels, probs, split_path, dataset_digest, tags, held_out
        )
    return choice


def _model_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("input_size", "weights", "variant", "mask_overlay")
    return {k: config[k] for k in keys if k in config}
