"""
# Leukaemia classifier: train, select and promote

Syncs new blood-smear images from S3, splits them (identical images kept together), extracts frozen
VGG16 features once (mapped over shards of the images), trains one head per **optimizer × batch
size × feature variant × head** (mapped tasks, each an MLflow run, each scored by k-fold
cross-validation over train + validation), selects the best by **mean cross-validated** macro-F1,
trains that configuration again on train + validation (`refit`), optionally replaces it by an
ensemble of the top heads or a fine-tuned model (`ensemble_top_k`, `fine_tune`: off by default),
runs the **shortcut audit** on it (region classifiers, overlay and background patch swaps, Grad-CAM
heat in the overlay square: warnings on the run and the version), registers it as
`leukemia-classifier` and **gates** it: candidate and
champion are evaluated on the same test split with MLflow, and `mlflow.validate_evaluation_results`
checks the clinical thresholds (macro-F1, malignant sensitivity, benign specificity, gain over the
champion). A candidate that misses one never becomes `@champion`. One that passes waits for a person
in **Required Actions** when approval is required (Promote / Keep the champion / Reject; no answer
in time keeps the champion). The thresholds and the approval requirement are the deployment's
policy (`LEUKEMIA_MIN_*`, `LEUKEMIA_PROMOTION_MARGIN`, `LEUKEMIA_REQUIRE_APPROVAL`,
`LEUKEMIA_APPROVAL_RESPONDENTS`): a run's Params may tighten them, never loosen them. Every version gets a model card;
`python -m leukemia champion history|rollback` shows and reverts the moves.

Tasks share nothing but the object store and MLflow: the manifest, split, feature shards and grid
report live in the work store (`LEUKEMIA_WORK_URI`, default `s3://<bucket>/work/`), and XCom carries
only their URIs and small dicts; any task may run on any worker, with an empty local folder.

Runs weekly and whenever new images land (the `leukemia_raw_images` asset). When the data is exactly
what the champion was trained on, training is skipped unless `force_retrain` is set.
All logic lives in `include/leukemia` (each task calls `leukemia.tasks.training_dag`); this file
only wires it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import (
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    TriggerRule,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException

from leukemia.config import HEADS, OPTIMIZERS, PRECISIONS, RUN_DEFAULTS, VARIANTS, env
from leukemia.tasks.approval import ReviewOperator
from leukemia.tasks.assets import champion_asset, raw_images_asset
from leukemia.tasks.params import policy_params, s3_params

IO_RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": True}


@dag(
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"), assets=raw_images_asset()
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["leukemia", "training", "mlflow"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        **s3_params("Bucket holding <prefix>/<Class>/<image>."),
        "optimizers": Param(
            list(RUN_DEFAULTS.optimizers),
            type="array",
            items={"type": "string", "enum": list(OPTIMIZERS)},
            title="Optimizers",
            description="One training task per optimizer × batch size × variant.",
        ),
        "batch_sizes": Param(
            list(RUN_DEFAULTS.batch_sizes),
            type="array",
            items={"type": "integer", "minimum": 1},
            title="Batch sizes",
        ),
        "variants": Param(
            list(RUN_DEFAULTS.variants),
            type="array",
            items={"type": "string", "enum": list(VARIANTS)},
            title="Feature variants",
            description="seed: block5 GlobalMaxPooling (the reference); multiscale: GAP+GMP of blocks 3-5.",
        ),
        "heads": Param(
            list(RUN_DEFAULTS.heads),
            type="array",
            items={"type": "string", "enum": list(HEADS)},
            title="Heads",
            description="mlp: Dense 256/128/64 with dropout (the reference); linear: standardise "
            "→ softmax with an L2 penalty.",
        ),
        "cv_folds": Param(
            RUN_DEFAULTS.cv_folds,
            type="integer",
            minimum=1,
            title="Cross-validation folds",
            description="Selection by mean k-fold macro-F1 over train + validation (folds grouped "
            "by content hash, stratified). 1: the single validation split.",
        ),
        "refit": Param(
            RUN_DEFAULTS.refit,
            type="boolean",
            title="Refit the winner on train + validation",
            description="Train the selected configuration again on train + validation for the "
            "epochs early stopping found (scaled to the larger set); that run is gated and "
            "registered.",
        ),
        "epochs": Param(
            RUN_DEFAULTS.epochs,
            type="integer",
            minimum=1,
            title="Max epochs",
            description="Early stopping on validation loss restores the best epoch.",
        ),
        "patience": Param(
            RUN_DEFAULTS.patience, type="integer", minimum=1, title="Early-stopping patience"
        ),
        "learning_rate": Param(
            RUN_DEFAULTS.learning_rate,
            type=["null", "number"],
            title="Learning rate",
            description="Empty: adam/rmsprop 1e-3, sgd 1e-2 with momentum.",
        ),
        "weights": Param(
            env("LEUKEMIA_WEIGHTS"),
            type="string",
            title="VGG16 weights",
            description="imagenet, a local VGG16 no-top .h5 path (air-gapped sites), or none.",
        ),
        "input_size": Param(
            RUN_DEFAULTS.input_size, type="integer", minimum=32, title="Input size (px)"
        ),
        "precision": Param(
            RUN_DEFAULTS.precision,
            type="string",
            enum=list(PRECISIONS),
            title="Extraction precision",
            description="auto: bfloat16 where the CPU/GPU supports it.",
        ),
        "extract_shards": Param(
            RUN_DEFAULTS.extract_shards,
            type="integer",
            minimum=0,
            title="Extraction shards",
            description="Mapped extraction tasks, each on its own slice of the images. "
            "0: one per 500 images (at most 64).",
        ),
        **policy_params(),  # the gate and approval: deployment policy, a run may only tighten
        "approval_timeout_hours": Param(
            RUN_DEFAULTS.approval_timeout_hours,
            type="number",
            exclusiveMinimum=0,
            title="Approval timeout (hours)",
            description="With no answer in time the champion stays (the candidate becomes challenger).",
        ),
        "max_failed_fraction": Param(
            RUN_DEFAULTS.max_failed_fraction,
            type="number",
            minimum=0,
            maximum=1,
            title="Tolerated failed downloads",
            description="Share of listed images that may fail to download before the sync fails "
            "the run (bad images are skipped, not failed). 0: train only on a complete sync.",
        ),
        "mask_overlay": Param(
            RUN_DEFAULTS.mask_overlay,
            type="boolean",
            title="Mask the scale-bar overlay",
            description="Fill the bottom-right scale-bar square inside the model, so that no "
            "model reads the microscope's overlay instead of the cells (part of the feature-cache key).",
        ),
        "augment_copies": Param(
            RUN_DEFAULTS.augment_copies,
            type="integer",
            minimum=0,
            title="Augmented copies per training image",
            description="Stain and background robustness: each train and validation image also "
            "trains the heads as this many copies with HED stain jitter, background patches of "
            "other images and lighting changes (extracted once, cached). 0: none.",
        ),
        "ensemble_top_k": Param(
            RUN_DEFAULTS.ensemble_top_k,
            type="integer",
            minimum=0,
            title="Ensemble of the top k",
            description="Register the mean of the top-k heads' softmax (one trunk, k heads) when it "
            "beats the best single head on validation macro-F1. 0 or 1: off.",
        ),
        "fine_tune": Param(
            RUN_DEFAULTS.fine_tune,
            type="boolean",
            title="Fine-tune the winner",
            description="Unfreeze the last VGG16 blocks of the selected model and train it from "
            "pixels with flips and rotations (slow without a GPU; runs on the training queue).",
        ),
        "fine_tune_blocks": Param(
            RUN_DEFAULTS.fine_tune_blocks,
            type="integer",
            minimum=1,
            maximum=5,
            title="Fine-tuned VGG16 blocks",
            description="How many of the last conv blocks to unfreeze: 1 = block5.",
        ),
        "fine_tune_learning_rate": Param(
            RUN_DEFAULTS.fine_tune_learning_rate,
            type="number",
            exclusiveMinimum=0,
            title="Fine-tuning learning rate (Adam)",
        ),
        "fine_tune_epochs": Param(
            RUN_DEFAULTS.fine_tune_epochs,
            type="integer",
            minimum=1,
            title="Fine-tuning max epochs",
            description="Early stopping on validation loss (patience as above) keeps the best epoch.",
        ),
        "audit_images": Param(
            RUN_DEFAULTS.audit_images,
            type="integer",
            minimum=0,
            title="Shortcut audit: images",
            description="Test images (and as many train images) the candidate's shortcut audit "
            "reads: overlay and background classifiers, patch swaps, Grad-CAM. 0: no audit.",
        ),
        "force_retrain": Param(
            False,
            type="boolean",
            title="Force retrain",
            description="Train even if the data equals the champion's.",
        ),
    },
)
def leukemia_training() -> None:
    @task(**IO_RETRIES)
    def sync_images() -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps

        run = _request()
        return steps.sync(
            run.bucket, run.prefix, run.conn_id, run.max_failed_fraction, run.work_uri
        )

    @task
    def build_split(synced: dict[str, Any]) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps

        return steps.split(synced["manifest_uri"], synced["images_uri"], synced["work_uri"])

    @task.short_circuit
    def data_changed(split: dict[str, Any]) -> bool:
        from leukemia.tasks import training_dag as steps

        run = _request()
        return steps.needs_training(split["digest"], run.force_retrain)

    @task
    def plan_extraction(split: dict[str, Any]) -> list[dict[str, Any]]:
        from leukemia.tasks import training_dag as steps
        from leukemia.weights import WeightsUnavailable

        run = _request()
        try:
            return steps.plan_extraction(split, run)
        except WeightsUnavailable as exc:  # a retry cannot fix a setting: fail at once, one line
            raise AirflowFailException(str(exc)) from None

    @task(map_index_template="{{ shard_label }}", queue=env("LEUKEMIA_TRAINING_QUEUE"))
    def extract_features(shard: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps
        from leukemia.weights import WeightsUnavailable

        get_current_context()["shard_label"] = f"shard {shard['shard'] + 1}/{shard['shards']}"
        try:
            return steps.extract(split, shard)
        except WeightsUnavailable as exc:
            raise AirflowFailException(str(exc)) from None

    @task
    def plan_grid() -> list[dict[str, Any]]:
        from leukemia.tasks import training_dag as steps

        run = _request()
        return [{"config": c} for c in steps.plan(run)]

    @task(
        map_index_template="{{ config_label }}",
        queue=env("LEUKEMIA_TRAINING_QUEUE"),
        max_active_tis_per_dagrun=int(env("LEUKEMIA_TRAINING_SLOTS")),
    )
    def train(
        config: dict[str, Any], split: dict[str, Any], shards: list[dict[str, Any]]
    ) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps
        from leukemia.training import config_label

        context = get_current_context()
        context["config_label"] = config_label(
            config["optimizer"], config["batch_size"], config["variant"], config.get("head", "mlp")
        )
        return steps.train_one(config, split, steps.features_of(_items(shards)), _run_tags())

    # a failed configuration must not stop the others from being compared and gated; the split
    # is pulled rather than wired in, so that the training tasks are the only upstream: when none
    # of them succeeded, nothing is selected
    @task(trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)
    def select_candidate(results: list[dict[str, Any]]) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps

        return steps.select_candidate(get_current_context()["run_id"])

    # the selected configuration trained again on train + val (off: the selected run goes on)
    @task(queue=env("LEUKEMIA_TRAINING_QUEUE"))
    def refit(
        candidate: dict[str, Any], split: dict[str, Any], shards: list[dict[str, Any]]
    ) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps

        run = _request()
        features = steps.features_of(_items(shards))
        return steps.refit(candidate, split, features, run.refit, _run_tags())

    # optional stages after selection; each returns the candidate dict, with `run_id` naming the
    # run the gate registers (unchanged when the stage is off or does not beat the candidate)
    @task
    def ensemble(
        candidate: dict[str, Any], split: dict[str, Any], shards: list[dict[str, Any]]
    ) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps

        run = _request()
        features = steps.features_of(_items(shards))
        return steps.ensemble(candidate, split, features, run.ensemble_top_k, _run_tags())

    @task(queue=env("LEUKEMIA_TRAINING_QUEUE"))
    def fine_tune(candidate: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps

        run = _request()
        return steps.fine_tune(
            candidate,
            split,
            run.fine_tune,
            run.fine_tune_blocks,
            run.fine_tune_learning_rate,
            run.fine_tune_epochs,
            run.patience,
            _run_tags(),
        )

    # the shortcut audit of the run the gate registers: warnings on the run and its version, not a
    # gate (its failure fails the DAG run before anything is registered)
    @task(queue=env("LEUKEMIA_TRAINING_QUEUE"))
    def audit(candidate: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps

        run = _request()
        return steps.audit(candidate, split, run.audit_images)

    # registers `selected["run_id"]` (whatever the upstream step chose) and gates it; never moves
    # an alias, and any error fails the task with @champion unchanged
    @task
    def register_and_gate(selected: dict[str, Any]) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps

        context = get_current_context()
        run = _request()
        split = context["ti"].xcom_pull(task_ids="build_split")
        return steps.register_and_gate(selected, split, run, context["run_id"])

    # asks a person when the gate passed and require_approval is on; else decides at once
    approval = ReviewOperator(task_id="approval", gate_task_id="register_and_gate")

    @task(outlets=[champion_asset()])
    def promote(gated: dict[str, Any]) -> dict[str, Any]:
        return _decide(gated, "promote")

    @task
    def keep_champion(gated: dict[str, Any]) -> dict[str, Any]:
        return _decide(gated, "keep_champion")

    @task
    def reject(gated: dict[str, Any]) -> dict[str, Any]:
        return _decide(gated, "reject")

    # the grid and the gate, also when selection or the gate failed, so the trained grid is never
    # lost from view; it does not wait for the person (the decision is on the version and its card)
    @task(trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)
    def report(results: list[dict[str, Any]], gated: dict[str, Any] | None) -> dict[str, Any]:
        from leukemia.tasks import training_dag as steps

        context = get_current_context()
        run = _request()
        finished = _items(results)  # a failed configuration has no result
        return steps.report(
            [r for r in finished if r], gated, context["run_id"], run.work_uri, run.require_approval
        )

    split = build_split(sync_images())
    plan = plan_extraction(split)
    shards = extract_features.partial(split=split).expand(shard=plan)
    grid = plan_grid()
    data_changed(split) >> [plan, grid]
    results = train.partial(split=split, shards=shards).expand_kwargs(grid)
    candidate = select_candidate(results)
    candidate = refit(candidate, split, shards)
    candidate = ensemble(candidate, split, shards)
    candidate = fine_tune(candidate, split)
    candidate = audit(candidate, split)
    gated = register_and_gate(candidate)
    gated >> approval >> [promote(gated), keep_champion(gated), reject(gated)]
    report(results, gated)


def _items(values: Sequence[Any]) -> list[Any]:
    """The values of a mapped task's results, read by index after one count (iterating the lazy
    sequence reads until a missing offset, which the task log shows as an 'XCom not found' error)."""
    return [values[i] for i in range(len(values))]


def _request() -> Any:
    """This run's `RunRequest`; a conf that loosens the deployment's policy fails the task at once,
    without retries (it would fail the same way again)."""
    from leukemia.policy import PolicyViolation
    from leukemia.tasks import training_dag as steps

    try:
        return steps.RunRequest.from_params(get_current_context()["params"])
    except PolicyViolation as exc:
        raise AirflowFailException(str(exc)) from None


def _run_tags() -> dict[str, str]:
    """The Airflow identity of this task instance, as tags of the MLflow runs it starts."""
    ti = get_current_context()["ti"]
    return {
        "airflow_dag_id": ti.dag_id,
        "airflow_run_id": ti.run_id,
        "airflow_map_index": str(ti.map_index),
    }


def _decide(gated: dict[str, Any], task_id: str) -> dict[str, Any]:
    """Apply the reviewer's (or the gate's) decision, which must be this task's."""
    from leukemia.tasks import training_dag as steps

    ti = get_current_context()["ti"]
    review = ti.xcom_pull(task_ids="approval", key="review")
    return steps.decide(gated, review, task_id, f"{ti.dag_id}/{ti.run_id}")


leukemia_training()
