"""Successive halving over the grid: the rounds' folds, the folds fitted in rounds against all at
once, pruning in MLflow, and selection that sees only the finalists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leukemia.halving import ETA, Round, rounds, survivors
from leukemia.model import ModelConfig
from leukemia.training import TrainConfig

SIZE = 48


def test_rounds_fit_one_fold_then_up_to_three_then_all_and_keep_the_best_third() -> None:
    assert rounds(5, True) == [Round(1, 0, 1, False), Round(2, 1, 3, False), Round(3, 3, 5, True)]
    assert rounds(3, True) == [Round(1, 0, 1, False), Round(2, 1, 3, True)]
    assert rounds(2, True) == [Round(1, 0, 1, False), Round(2, 1, 2, True)]
    assert rounds(10, True)[-1] == Round(3, 3, 10, True)  # never more rounds than the DAG has
    assert rounds(5, False) == [Round(1, 0, 5, True)]  # off: one round of every fold
    assert rounds(1, True) == [Round(1, 0, 0, True)]  # no CV: nothing to halve
    assert ETA == 3
    assert [survivors(n) for n in (18, 6, 2, 1, 4)] == [6, 2, 1, 1, 2]


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Synthetic smears (48 px, 10 per class), a split and their features, no copies."""
    from leukemia.dataset import make_split, read_split
    from leukemia.dev.synthetic import generate
    from leukemia.features import extract_features

    root = tmp_path_factory.mktemp("halving")
    generate(root / "images", n_per_class=10, size=SIZE, seed=3)
    info = make_split(root / "images", root / "splits", fractions=(0.6, 0.2, 0.2))
    rows = read_split(info.path)
    extracted = extract_features(
        [root / "images" / r["path"] for r in rows],
        [r["sha256"] for r in rows],
        ModelConfig(SIZE, "none", "seed"),
        root / "features",
        precision="float32",
    )
    return {"root": root, "split": info, "rows": rows, "cache": extracted.cache_dir}


def _cfg(optimizer: str = "adam", batch_size: int = 8) -> TrainConfig:
    return TrainConfig(
        optimizer=optimizer,
        batch_size=batch_size,
        epochs=3,
        cv_folds=3,
        augment_copies=0,
        model=ModelConfig(SIZE, "none", "seed"),
    )


def test_folds_fitted_in_rounds_equal_every_fold_at_once(cached: dict[str, Any]) -> None:
    from leukemia.runs import train_val_arrays
    from leukemia.training import cross_validate, split_arrays

    x, y, shas = train_val_arrays(split_arrays(cached["rows"], cached["cache"], "seed"))
    cfg = _cfg()
    whole = cross_validate(cfg, x, y, shas, 3)
    parts = [cross_validate(cfg, x, y, shas, 3, only=r.folds) for r in rounds(3, True)]
    assert [f["number"] for p in parts for f in p["folds"]] == [1, 2, 3]
    assert [f for p in parts for f in p["folds"]] == whole["folds"]
    oof = np.zeros_like(whole["oof"])
    for part in parts:
        oof[part["held_out"]] = part["oof"][part["held_out"]]
    np.testing.assert_allclose(oof, whole["oof"], atol=1e-6)
    assert sorted(i for p in parts for i in p["held_out"]) == list(range(len(y)))


def test_halving_prunes_in_mlflow_and_selection_sees_only_the_finalist(
    cached: dict[str, Any], mlflow_env: Path
) -> None:
    from leukemia import halving, promotion, selection, tracking
    from leukemia.runs import train_round, train_run

    split = cached["split"]
    where = (split.path, cached["root"] / "images", cached["cache"])
    tags = {"airflow_run_id": "manual__h"}
    configs = [_cfg(o, b) for o in ("adam", "sgd") for b in (8, 16)]  # 4: 2 go on, then 1
    first = [
        train_round(c, *where, 1, None, {**tags, "airflow_map_index": str(i)}, split.digest)
        for i, c in enumerate(configs)
    ]
    assert all("val" not in r and r["round"] == 1 for r in first)  # one fold each, no outcome
    assert all(r["mlflow_url"].endswith(r["run_id"]) for r in first)  # the task's UI link
    experiment = tracking.setup()
    scored = selection.round_runs(experiment, "manual__h", 1)
    assert len(scored) == 4 and selection.finished_runs(experiment, "manual__h") == []
    onward = halving.prune(scored, 1)
    assert len(onward) == 2 and {o["round_number"] for o in onward} == {2}
    order = halving.ranked(scored, 1)
    assert [o["run_id"] for o in onward] == [r.info.run_id for r in order[:2]]
    for run in order[2:]:  # pruned, with the score that pruned it
        after = tracking.get_run(run.info.run_id)
        assert after.data.tags[halving.PRUNED_TAG] == "true"
        assert after.data.tags[halving.PRUNED_AFTER_TAG] == "1"
        score = after.data.metrics["cv_fold1_val_f1_macro"]
        assert after.data.metrics[halving.PRUNED_SCORE_METRIC] == pytest.approx(score)
    # round 2 is the last of 3 folds: both finish as full runs, prune then keeps nobody going
    done = [
        train_round(TrainConfig.from_dict(o["config"]), *where, 2, o["run_id"], tags, split.digest)
        for o in onward
    ]
    assert all(d["cv"]["cv_f1_macro_mean"] > 0 and d["val"] and d["test"] for d in done)
    assert halving.prune(selection.round_runs(experiment, "manual__h", 2), 2) == []
    finalists = selection.finished_runs(experiment, "manual__h")
    assert {r.info.run_id for r in finalists} == {o["run_id"] for o in onward}
    assert all("cv_fold3_val_f1_macro" in r.data.metrics for r in finalists)
    assert selection.best_run(finalists).info.run_id in {d["run_id"] for d in done}
    assert len(selection.pruned_runs(experiment, "manual__h")) == 2
    chosen = promotion.select_candidate(experiment, "manual__h")
    assert chosen["configurations"] == 2
    assert (
        " of 2 finalist(s) of 4 configurations (halving) trained by manual__h"
        in chosen["selection"]
    )
    # a finalist's CV means, validation and test metrics equal an unhalved run of its config
    same = train_run(TrainConfig.from_dict(done[0]["config"]), *where)
    assert done[0]["cv"]["cv_f1_macro_mean"] == pytest.approx(same.cv["cv_f1_macro_mean"])
    assert done[0]["val"] == pytest.approx(same.val) and done[0]["test"] == pytest.approx(same.test)
    # the grid's rows: the two outcomes as the finalists returned them, two pruned with a score
    rows = {r["run_id"]: r for r in halving.outcomes(first)}
    assert sorted("pruned_after_round" in r for r in rows.values()) == [False, False, True, True]
    for d in done:
        assert rows[d["run_id"]]["val"] == pytest.approx(d["val"])
        assert rows[d["run_id"]]["cv"] == pytest.approx(d["cv"])
