"""Successive halving over the training grid: most configurations are clearly behind after one fold.

With `halving` on (a Param), every configuration is scored on the first fold of the k-fold
cross-validation, the best third (`ETA`) goes on to the next folds, and only the finalists fit the
rest and become full runs as without halving (the head fitted on train, calibrated on the
out-of-fold probabilities of all k folds, evaluated and logged): selection compares only them, by
the same mean CV macro-F1. The folds are the same for every configuration (`training.cv_folds`).

A round is one mapped training task per configuration (`train`, `train_round2`, `train_round3` in
the training DAG) and one MLflow run per configuration across its rounds; between rounds `prune`
tags the runs that stop `pruned` with the score that stopped them. Off, round 1 is the whole
cross-validated run of today and the later rounds get nothing to do.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from leukemia.training import fold_summary

log = logging.getLogger(__name__)

#: Each round keeps the best 1/ETA of the configurations it scored (at least one).
ETA = 3
#: Rounds the training DAG has (a mapped training task each); `rounds` never plans more.
MAX_ROUNDS = 3
#: Tags and metrics a run gets (`runs.train_round`, `prune`).
ROUND_TAG = "halving_round"
PRUNED_TAG = "pruned"
PRUNED_AFTER_TAG = "pruned_after_round"
SCORE_METRIC = "halving_f1_macro"
LOSS_METRIC = "halving_log_loss"
PRUNED_SCORE_METRIC = "pruned_score"


@dataclass(frozen=True)
class Round:
    """One round: the folds it fits (0-based, `first` up to `stop`), and whether it is the last
    one, which also fits the head on train and logs the run's outcome."""

    number: int
    first: int
    stop: int
    final: bool

    @property
    def folds(self) -> range:
        """The 0-based fold indices this round fits."""
        return range(self.first, self.stop)


def rounds(k: int, halving: bool) -> list[Round]:
    """The rounds of a k-fold run: one round of all k folds without halving (or without CV,
    k < 2: no fold); with it, 1 fold, then up to `ETA` folds in all, then all k."""
    if not halving or k < 2:
        return [Round(1, 0, k if k >= 2 else 0, True)]
    marks = sorted({1, min(ETA, k), k})[:MAX_ROUNDS]
    starts = [0, *marks[:-1]]
    return [
        Round(i, start, stop, stop == marks[-1])
        for i, (start, stop) in enumerate(zip(starts, marks, strict=True), 1)
    ]


def survivors(n: int) -> int:
    """How many of n scored configurations go on to the next round."""
    return max(1, math.ceil(n / ETA))


def fold_score(folds: Sequence[Mapping[str, float]]) -> tuple[float, float]:
    """(mean macro-F1, mean log-loss) of the folds fitted so far (`training.cross_validate`'s
    `folds` entries)."""
    summary = fold_summary(folds)
    return summary["f1_macro_mean"], summary["log_loss_mean"]


def rank_key(folds: Sequence[Mapping[str, float]]) -> tuple[float, float]:
    """Best first when sorted: higher mean macro-F1, then lower mean log-loss, as selection ranks
    by the full CV means."""
    f1, loss = fold_score(folds)
    return -f1, loss


def score(metrics: Mapping[str, float], folds: int) -> tuple[float, float]:
    """`fold_score` of the first `folds` folds a run logged (`tracking.logged_folds`)."""
    from leukemia.tracking import logged_folds

    return fold_score(logged_folds(metrics, folds))


def ranked(runs: list[Any], folds: int) -> list[Any]:
    """Runs best first by `rank_key` over their first `folds` folds."""
    from leukemia.tracking import logged_folds

    return sorted(runs, key=lambda r: rank_key(logged_folds(r.data.metrics, folds)))


def next_round(run: Any, number: int) -> dict[str, Any]:
    """The mapped kwargs of round `number` of a run's configuration (`tasks.training_dag.train`)."""
    return {
        "config": json.loads(run.data.tags["config"]),
        "run_id": run.info.run_id,
        "round_number": number,
        "halving": True,
    }


def prune(runs: list[Any], number: int) -> list[dict[str, Any]]:
    """After round `number`: tag all but the best `survivors` of `runs` (the FINISHED, unpruned
    training runs that round scored) `pruned` with their score, and return the next round's
    mapped kwargs for the others; [] when that round was the last (or scored nothing)."""
    from leukemia import tracking

    if not runs:
        return []
    plan = rounds(int(runs[0].data.params["cv_folds_used"]), True)
    if number >= len(plan):
        return []
    folds = plan[number - 1].stop
    order = ranked(runs, folds)
    keep = survivors(len(order))
    for run in order[keep:]:
        f1, loss = score(run.data.metrics, folds)
        tracking.tag_run(
            run.info.run_id,
            {PRUNED_TAG: "true", PRUNED_AFTER_TAG: str(number)},
            {PRUNED_SCORE_METRIC: f1},
        )
        log.info(
            "%s: pruned after round %d (CV macro-F1 %.4f, log-loss %.4f over %d folds)",
            run.info.run_name,
            number,
            f1,
            loss,
            folds,
        )
    for run in order[:keep]:
        log.info(
            "%s: on to round %d (CV macro-F1 %.4f over %d folds)",
            run.info.run_name,
            number + 1,
            score(run.data.metrics, folds)[0],
            folds,
        )
    return [next_round(run, number + 1) for run in order[:keep]]


def outcomes(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first round's results as the grid's rows: each run that finished its rounds as its
    `TrainResult` dict would read (val and test metrics from its `metrics.json`, CV means, epochs),
    each pruned one with `pruned_after_round` and the score that pruned it; a run that failed in a
    later round is left out, as a failed configuration is. Results without halving pass as they are."""
    from leukemia import tracking

    out = []
    for result in results:
        if "val" in result:
            out.append(result)
            continue
        run = tracking.get_run(result["run_id"])
        metrics, tags = run.data.metrics, run.data.tags
        base = {"run_id": result["run_id"], "config": result["config"]}
        if tags.get(PRUNED_TAG) == "true":
            after = int(tags[PRUNED_AFTER_TAG])
            out.append(
                {**base, "pruned_after_round": after, SCORE_METRIC: metrics[PRUNED_SCORE_METRIC]}
            )
        elif "head_uri" in tags:
            with open(tracking.download(result["run_id"], "metrics.json")) as f:
                split_metrics = json.load(f)
            out.append(
                {
                    **base,
                    **{
                        s: {k: v for k, v in split_metrics[s].items() if k != "confusion_matrix"}
                        for s in ("val", "test")
                    },
                    "cv": {
                        k: v
                        for k, v in metrics.items()
                        if k.startswith("cv_") and k.endswith(("_mean", "_std"))
                    },
                    "epochs_run": int(run.data.params.get("epochs_run", 0)),
                }
            )
    return out
