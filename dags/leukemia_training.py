"""
# Leukaemia classifier: train, select and promote

Syncs new blood-smear images from S3, splits them (identical images kept together), extracts frozen
VGG16 features once (mapped over shards), trains one head per **optimizer × batch size × variant ×
head** (mapped, one MLflow run each, scored by k-fold cross-validation over train + validation; with
`halving`, in rounds that prune all but the best third), selects the best by **mean cross-validated**
macro-F1, trains it again on train + validation
(`refit`), optionally replaces it by an ensemble or a fine-tuned model (`ensemble_top_k`,
`fine_tune`), runs the **shortcut audit** on it, registers it as `leukemia-classifier` and
**gates** it against the champion on the same test split (`mlflow.validate_evaluation_results` on
macro-F1, malignant sensitivity, benign specificity, gain over the champion). A candidate that
misses one never becomes `@champion`; one that passes waits for a person in **Required Actions**
when approval is required. Thresholds and approval are the deployment's policy (`LEUKEMIA_MIN_*`,
`LEUKEMIA_PROMOTION_MARGIN`, `LEUKEMIA_REQUIRE_APPROVAL`, `LEUKEMIA_APPROVAL_RESPONDENTS`): a run's
Params may tighten them, never loosen them. `python -m leukemia champion history|rollback` shows
and reverts the moves of `@champion`.

Tasks share nothing but the object store and MLflow: everything they hand on lives in the work
store (`LEUKEMIA_WORK_URI`, default `s3://<bucket>/work/`); XCom carries only URIs and small dicts.
Runs weekly and when new images land (`leukemia_raw_images`); unchanged data is not retrained
unless `force_retrain`. A failed task, a candidate waiting for approval and a run not finished
`LEUKEMIA_TRAINING_DEADLINE_HOURS` after it was queued alert the deployment's recipients
(`LEUKEMIA_ALERT_*`, docs/alerts.md). All logic lives in `include/leukemia`
(`leukemia.tasks.training_dag`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import (
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    TriggerRule,
    dag,
    get_current_context,
    task,
)

from leukemia import alerts
from leukemia.config import env
from leukemia.tasks import training_dag as steps
from leukemia.tasks.approval import ReviewOperator
from leukemia.tasks.assets import champion_asset, raw_images_asset
from leukemia.tasks.params import s3_params, task_defaults, training_params
from leukemia.training import config_label
from leukemia.weights import WeightsUnavailable

IO_RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": True}
HEAVY = {"queue": env("LEUKEMIA_TRAINING_QUEUE")}  # the queue of the workers that train
_request = steps.current_request  # this run's RunRequest; a looser policy fails at once


@dag(
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"), assets=raw_images_asset()
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["leukemia", "training", "mlflow"],
    default_args=task_defaults(),
    deadline=alerts.training_deadline(),  # not finished N hours after queued: an alert
    # every run setting is declared once, in leukemia.config.RunDefaults (the gate and approval:
    # the deployment's policy, a run may only tighten them)
    params={**s3_params("Bucket holding <prefix>/<Class>/<image>."), **training_params()},
)
def leukemia_training() -> None:
    @task(**IO_RETRIES)
    def sync_images() -> dict[str, Any]:
        run = _request()
        return steps.sync(
            run.bucket, run.prefix, run.conn_id, run.max_failed_fraction, run.work_uri
        )

    @task
    def build_split(synced: dict[str, Any]) -> dict[str, Any]:
        return steps.split(synced["manifest_uri"], synced["images_uri"], synced["work_uri"])

    @task.short_circuit
    def data_changed(split: dict[str, Any]) -> bool:
        return steps.needs_training(split["digest"], _request().force_retrain)

    @task
    def plan_extraction(split: dict[str, Any]) -> list[dict[str, Any]]:
        with steps.fail_at_once(WeightsUnavailable):  # a retry cannot fix a setting
            return steps.plan_extraction(split, _request())

    @task(map_index_template="{{ shard_label }}", **HEAVY)
    def extract_features(shard: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
        get_current_context()["shard_label"] = f"shard {shard['shard'] + 1}/{shard['shards']}"
        with steps.fail_at_once(WeightsUnavailable):
            return steps.extract(split, shard)

    @task
    def plan_grid() -> list[dict[str, Any]]:
        return [{"config": c, "halving": _request().halving} for c in steps.plan(_request())]

    @task(
        map_index_template="{{ config_label }}",
        max_active_tis_per_dagrun=int(env("LEUKEMIA_TRAINING_SLOTS")),
        **HEAVY,
    )
    def train(
        config: dict[str, Any],
        split: dict[str, Any],
        shards: list[dict[str, Any]],
        halving: bool = False,
        round_number: int = 1,
        run_id: str | None = None,
    ) -> dict[str, Any]:
        get_current_context()["config_label"] = config_label(
            config["optimizer"], config["batch_size"], config["variant"], config.get("head", "mlp")
        )
        features = steps.features_of(steps.mapped_items(shards))
        tags = steps.run_tags()
        return steps.train_one(config, split, features, tags, round_number, run_id, halving)

    # successive halving (`halving`): after each round the best third goes on to more folds; it
    # skips when there is no next round (halving off, the last round done, nothing scored)
    @task(trigger_rule=TriggerRule.ALL_DONE)
    def prune(round_number: int) -> list[dict[str, Any]]:
        return steps.prune(get_current_context()["run_id"], round_number)

    # a failed configuration must not stop the others from being compared and gated; when no
    # configuration finished, it skips (the failed training tasks say why)
    @task(trigger_rule=TriggerRule.ALL_DONE)
    def select_candidate() -> dict[str, Any]:
        return steps.select_candidate(get_current_context()["run_id"])

    # the selected configuration trained again on train + val (off: the selected run goes on)
    @task(**HEAVY)
    def refit(
        candidate: dict[str, Any], split: dict[str, Any], shards: list[dict[str, Any]]
    ) -> dict[str, Any]:
        features = steps.features_of(steps.mapped_items(shards))
        return steps.refit(candidate, split, features, _request().refit, steps.run_tags())

    # optional stages after selection; each returns the candidate, `run_id` the run to register
    @task
    def ensemble(
        candidate: dict[str, Any], split: dict[str, Any], shards: list[dict[str, Any]]
    ) -> dict[str, Any]:
        features = steps.features_of(steps.mapped_items(shards))
        top_k = _request().ensemble_top_k
        return steps.ensemble(candidate, split, features, top_k, steps.run_tags())

    @task(**HEAVY)
    def fine_tune(candidate: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
        return steps.fine_tune(candidate, split, _request(), steps.run_tags())

    # the shortcut audit of the run the gate registers: warnings on the run and version, not a gate
    @task(**HEAVY)
    def audit(candidate: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
        return steps.audit(candidate, split, _request().audit_images)

    # registers `selected["run_id"]` (whatever the upstream step chose) and gates it; never moves
    # an alias, and any error fails the task with @champion unchanged
    @task
    def register_and_gate(selected: dict[str, Any]) -> dict[str, Any]:
        context = get_current_context()
        split = context["ti"].xcom_pull(task_ids="build_split")
        return steps.register_and_gate(selected, split, _request(), context["run_id"])

    # asks a person when the gate passed and require_approval is on; else decides at once
    approval = ReviewOperator(
        task_id="approval",
        gate_task_id="register_and_gate",
        notifiers=alerts.notifiers(alerts.Event.APPROVAL),
    )

    # each applies the reviewer's (or the gate's) decision, which must be its own
    @task(outlets=[champion_asset()])
    def promote(gated: dict[str, Any]) -> dict[str, Any]:
        return steps.decide_in_task(gated, "promote")

    @task
    def keep_champion(gated: dict[str, Any]) -> dict[str, Any]:
        return steps.decide_in_task(gated, "keep_champion")

    @task
    def reject(gated: dict[str, Any]) -> dict[str, Any]:
        return steps.decide_in_task(gated, "reject")

    # the grid and the gate, also when selection or the gate failed, so the trained grid is never
    # lost from view; it does not wait for the person (the decision is on the version and its card)
    @task(trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)
    def report(results: list[dict[str, Any]], gated: dict[str, Any] | None) -> dict[str, Any]:
        run, finished = _request(), steps.mapped_items(results)  # a failed config: no result
        done, airflow_run = [r for r in finished if r], get_current_context()["run_id"]
        return steps.report(done, gated, airflow_run, run.work_uri, run.require_approval)

    split = build_split(sync_images())
    plan = plan_extraction(split)
    shards = extract_features.partial(split=split).expand(shard=plan)
    grid = plan_grid()
    data_changed(split) >> [plan, grid]
    results = train.partial(split=split, shards=shards).expand_kwargs(grid)
    rounds = [results]
    for n in (2, 3):  # more folds for the best third of the round before (none without halving)
        survivors = prune.override(task_id=f"prune_round{n - 1}")(n - 1)
        rounds[-1] >> survivors
        rounds.append(
            train.override(task_id=f"train_round{n}")
            .partial(split=split, shards=shards)
            .expand_kwargs(survivors)
        )
    candidate = select_candidate()
    rounds >> candidate
    candidate = refit(candidate, split, shards)
    candidate = ensemble(candidate, split, shards)
    candidate = fine_tune(candidate, split)
    candidate = audit(candidate, split)
    gated = register_and_gate(candidate)
    gated >> approval >> [promote(gated), keep_champion(gated), reject(gated)]
    report(results, gated)


leukemia_training()
