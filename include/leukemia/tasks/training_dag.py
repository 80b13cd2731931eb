"""The steps of the `leukemia_training` DAG: one function per task, typed values in, small dicts out.

The DAG turns its Params into one `RunRequest` (the only place a Params mapping is read) and calls
one function here per task, so every step runs and is tested without Airflow; XCom carries only what
these return (URIs, ids, metrics), never a local path.

Tasks share nothing but the object store and the MLflow server: each step reads what it needs from
the work store (`RunRequest.work_uri`, LEUKEMIA_WORK_URI) or S3 and writes what the next one needs
there. A worker's local folder (LEUKEMIA_DATA_DIR) is a cache that may be empty at any step.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from leukemia.config import RUN_DEFAULTS, RunDefaults, StorageConfig, env, setting_type, work_uri
from leukemia.objectstore import with_conn

log = logging.getLogger(__name__)


def _typed(value: Any, hint: Any) -> Any:
    """A Param's value as the declared type of its setting (tuple[X, ...], X | None, X)."""
    scalar, _, sequence = setting_type(hint)
    return tuple(scalar(v) for v in value) if sequence else scalar(value)


@dataclass(frozen=True)
class RunRequest(RunDefaults):
    """What one training DAG run was asked to do: every setting of `config.RunDefaults` (declared
    there once), typed, from the run's Params."""

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RunRequest:
        """Convert a DAG run's Params once, by each setting's declared type (absent or empty keys:
        the defaults; settings declared with an `env` default: that environment setting).

        The gate's thresholds and the approval settings are the deployment's policy
        (`policy.Policy.from_env`) tightened by the Params; a looser Param raises
        `policy.PolicyViolation` (one line), so no task of such a run does anything.
        """
        from leukemia.policy import POLICY_PARAMS, Policy

        policy = Policy.from_env().tightened(params)
        values: dict[str, Any] = {name: getattr(policy, name) for name in POLICY_PARAMS}
        declared = RunDefaults.params()
        for name, hint in typing.get_type_hints(RunDefaults).items():
            value = params.get(name)
            if name in POLICY_PARAMS:
                continue
            if value is None or value == "":
                if "env" in declared.get(name, {}):
                    values[name] = env(declared[name]["env"])
                continue
            values[name] = _typed(value, hint)
        return cls(**values)

    def thresholds(self) -> Any:
        """The promotion gate's thresholds (`gate.Thresholds`); the margin is the gain over the
        champion."""
        from leukemia.gate import Thresholds

        return Thresholds.of(self)

    @property
    def work_uri(self) -> str:
        """The work store of this run: LEUKEMIA_WORK_URI, else `s3://<bucket>/work/`."""
        return with_conn(work_uri(self.bucket or None), self.conn_id or None)


def sync(
    bucket: str | None = None,
    prefix: str | None = None,
    conn_id: str | None = None,
    max_failed_fraction: float = 0.0,
    work: str | None = None,
) -> dict[str, Any]:
    """Sync new and changed images from S3, keeping the manifest and report in the work store.

    The sync starts from the work store's manifest, so on a fresh worker (an empty local folder) an
    unchanged bucket is one listing and no download; new objects are still checked and hashed here
    (their local copies are a cache nobody downstream reads). Fails when more than
    `max_failed_fraction` of the listed objects failed to download (bad images are skipped, not
    failed), so that nothing is trained on a partial image set.
    """
    from leukemia.objectstore import inside, open_store
    from leukemia.storage import MANIFEST_NAME, REPORT_NAME, sync_images

    cfg = StorageConfig.from_env(
        bucket=bucket or None, prefix=prefix or None, conn_id=conn_id or None
    )
    images_uri = with_conn(f"s3://{cfg.bucket}/{cfg.prefix}", cfg.conn_id)
    work = work or RunRequest(bucket=cfg.bucket, conn_id=cfg.conn_id).work_uri
    if inside(work, images_uri):
        raise ValueError(
            f"the work store {work} lies inside the images prefix {images_uri}: its files would be "
            "listed as images. Set LEUKEMIA_WORK_URI (or the prefix) so that they do not overlap"
        )
    folder = open_store(work, cfg.conn_id).child(f"sync/{cfg.bucket}/{cfg.prefix}")
    try:
        manifest = json.loads(folder.read_bytes(MANIFEST_NAME))
    except FileNotFoundError:
        manifest = None  # the first sync of this prefix into this work store
    result = sync_images(cfg, manifest=manifest)
    result.manifest_path = folder.write_bytes(
        MANIFEST_NAME, (cfg.local_dir / MANIFEST_NAME).read_bytes()
    )
    result.report_path = folder.write_bytes(REPORT_NAME, (cfg.local_dir / REPORT_NAME).read_bytes())
    result.require_complete(max_failed_fraction)
    if result.images == 0:
        raise ValueError(
            f"no usable images under s3://{cfg.bucket}/{cfg.prefix}: expected "
            f"{cfg.prefix}<Benign|Early|Pre|Pro>/<name>.jpg (see {result.report_path})"
        )
    summary = result.summary()
    return {
        **{k: v for k, v in summary.items() if not k.endswith("_path")},
        "manifest_uri": result.manifest_path,
        "report_uri": result.report_path,
        "images_uri": images_uri,
        "work_uri": work,
    }


def split(manifest_uri: str, images_uri: str, work: str, seed: int = 0) -> dict[str, Any]:
    """Manifest and stable split of the synced images, saved in the work store under its digest."""
    from leukemia.dataset import records_from_manifest, save_split
    from leukemia.objectstore import join, read_location

    records = records_from_manifest(json.loads(read_location(manifest_uri)))
    info = save_split(records, join(work, "splits"), seed=seed)
    out = asdict(info)
    out["images_uri"] = images_uri
    out["work_uri"] = work
    out["conflicts"] = len(info.conflicts)
    return out


def needs_training(digest: str, force: bool = False, model_name: str | None = None) -> bool:
    """False when the champion was trained on exactly this image set (and no retrain is forced)."""
    from leukemia import registry, tracking

    tracking.setup()
    model_name = registry.model_name(model_name)
    trained_on = registry.champion_digest(model_name)
    if force:
        log.info("force_retrain is set: training even though the data may be unchanged")
        return True
    if trained_on == digest:
        log.info(
            "Dataset digest %s equals the one champion %s was trained on: skipping training "
            "(set force_retrain to train anyway)",
            digest[:12],
            model_name,
        )
        return False
    log.info(
        "Dataset digest %s is new (champion: %s): training",
        digest[:12],
        (trained_on or "none")[:12],
    )
    return True


def fine_tunes_from_activations(request: RunDefaults) -> bool:
    """Whether the run fine-tunes block 5 from block-4 activations, which its extraction pass
    then caches too (`finetune.FineTuneConfig.from_activations`)."""
    from leukemia.finetune import FineTuneConfig

    return request.fine_tune and FineTuneConfig.of(request).from_activations


def plan_extraction(split_info: dict[str, Any], request: RunRequest) -> list[dict[str, Any]]:
    """The extraction shards: one small dict each, saying which slice and where the features go.

    Settles once what every shard must agree on: the weights (resolved first: `WeightsUnavailable`,
    one line with the fix, before any image is read; a weights file is loaded once to check it),
    the precision (`auto` resolved here), the backend and the cache folder they key: for int8, the
    folder of the int8 network calibrated on the split's training images (`backends.features_key`),
    and the Keras one a worker that cannot run int8 falls back to (`fallback_cache_dir`).
    """
    from leukemia.features import cache_dir_for, resolve_precision, shard_count
    from leukemia.model import ModelConfig, build_trunk
    from leukemia.objectstore import join
    from leukemia.weights import IMAGENET, NONE, resolve_weights

    weights = resolve_weights(request.weights)
    if weights not in (IMAGENET, NONE):
        build_trunk(ModelConfig(input_size=32, weights=weights))  # a bad file fails here, once
    precision = resolve_precision(request.precision)
    cfg = ModelConfig(
        input_size=request.input_size,
        weights=weights,
        mask_overlay=request.mask_overlay,
        backend=request.backend,
    )
    root = join(split_info["work_uri"], "features")
    keras_dir = cache_dir_for(root, cfg, precision)
    cache_dir = _int8_cache_dir(split_info, cfg, root, precision) or keras_dir
    shards = shard_count(int(split_info["images"]), request.extract_shards)
    log.info(
        "Extracting features of %d images in %d shards into %s",
        split_info["images"],
        shards,
        cache_dir,
    )
    where = {
        "cache_root": root,
        "cache_dir": cache_dir,
        "fallback_cache_dir": keras_dir,
        "weights": weights,
        "input_size": request.input_size,
        "mask_overlay": request.mask_overlay,
        "precision": precision,
        "backend": request.backend,
        "augment_copies": request.augment_copies,
        "activations": fine_tunes_from_activations(request),
    }
    return [{"shard": i, "shards": shards, **where} for i in range(shards)]


def _int8_cache_dir(split_info: dict[str, Any], cfg: Any, root: str, precision: str) -> str | None:
    """The folder of the split's int8 features (`extract_features` calibrates on the same
    training images); None for the keras backend or a split without training images."""
    from leukemia import backends
    from leukemia.dataset import read_split, training_shas
    from leukemia.features import cache_dir_for

    if cfg.backend != backends.INT8:
        return None
    rows = read_split(split_info["path"])
    paths = {r["sha256"]: r["path"] for r in rows}  # the identity hashes the sha256s only
    calibration = backends.training_calibration(paths, training_shas(rows), cfg.input_size)
    if calibration is None:
        return None
    return cache_dir_for(root, cfg, precision, backends.features_key(cfg, calibration))


def extract(split_info: dict[str, Any], shard: dict[str, Any]) -> dict[str, Any]:
    """One extraction shard (a `plan_extraction` item): its images read from S3, those not cached
    computed, a shard file per 500 of them in the work store; then the augmented copies of its
    train and val images (`augment_copies`), the same way; on int8, the float32 Keras features of
    its test images too (what the runs' int8 agreement is measured against)."""
    from leukemia.dataset import read_split, training_shas
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig
    from leukemia.objectstore import join

    rows = read_split(split_info["path"])
    cfg = ModelConfig(
        input_size=shard["input_size"],
        weights=shard["weights"],
        mask_overlay=bool(shard.get("mask_overlay", True)),
        backend=shard.get("backend", "keras"),
    )
    result = extract_features(
        [join(split_info["images_uri"], r["path"]) for r in rows],
        [r["sha256"] for r in rows],
        cfg,
        shard["cache_root"],
        precision=shard["precision"],
        shard=shard["shard"],
        shards=shard["shards"],
        augment=training_shas(rows),
        copies=int(shard.get("augment_copies", 0)),
        activations=bool(shard.get("activations", False)),
        reference=[r["sha256"] for r in rows if r["split"] == "test"],
    )
    if result.cache_dir not in (shard["cache_dir"], shard.get("fallback_cache_dir")):
        raise ValueError(
            f"this worker's weights {shard['weights']} key the cache {result.cache_dir}, not "
            f"{shard['cache_dir']}: give every worker the same weights file (and, for int8, the "
            "same openvino and nncf versions)"
        )
    return asdict(result)


def features_of(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """What the extraction shards made, as one small dict: the cache folder they all wrote to and
    the backend they used."""
    folders = sorted({s["cache_dir"] for s in shards})
    used = sorted({s.get("backend", "keras") for s in shards})
    if len(used) > 1:
        raise ValueError(
            f"the extraction shards used the backends {', '.join(used)}: some workers could not "
            "run int8 and fell back to keras (their task logs say why); install the int8 "
            "toolchain on every worker, or run with backend keras"
        )
    if len(folders) != 1:
        raise ValueError(f"the extraction shards wrote to {folders}: expected one cache folder")
    return {
        "cache_dir": folders[0],
        "backend": used[0],
        "images": sum(s["images"] for s in shards),
        "computed": sum(s["computed"] for s in shards),
        "shards": len(shards),
    }


def plan(request: RunRequest) -> list[dict[str, Any]]:
    """The grid as flat config dicts, one per mapped training task."""
    from leukemia.training import TrainConfig, grid

    base = TrainConfig.from_dict(
        {
            "epochs": request.epochs,
            "patience": request.patience,
            "learning_rate": request.learning_rate,
            "seed": request.seed,
            "input_size": request.input_size,
            "weights": request.weights,
            "head_units": request.head_units,
            "dropout": request.dropout,
            "mask_overlay": request.mask_overlay,
            "backend": request.backend,
            "augment_copies": request.augment_copies,
            "cv_folds": request.cv_folds,
            "conformal_coverage": request.conformal_coverage,
        }
    )
    configs = grid(
        list(request.optimizers),
        list(request.batch_sizes),
        list(request.variants),
        base,
        list(request.heads),
    )
    if not configs:
        raise ValueError(
            "the grid is empty: give at least one optimizer, batch size, variant and head"
        )
    return [c.to_dict() for c in configs]


def train_one(
    config: dict[str, Any],
    split_info: dict[str, Any],
    features_info: dict[str, Any],
    tags: dict[str, str] | None = None,
    round_number: int = 1,
    run_id: str | None = None,
    halving: bool = False,
) -> dict[str, Any]:
    """Train and log one configuration from the cached features (with `halving`: its round
    `round_number`, `runs.train_round`); returns the run id, head URI and metrics (an earlier
    round of halving: its score so far)."""
    from leukemia.runs import train_round, train_run
    from leukemia.training import TrainConfig

    cfg = TrainConfig.from_dict(config)
    where = (split_info["path"], split_info["images_uri"], features_info["cache_dir"])
    if halving:
        return train_round(cfg, *where, round_number, run_id, tags, split_info["digest"])
    return asdict(train_run(cfg, *where, tags=tags, dataset_digest=split_info["digest"]))


def prune(airflow_run_id: str, round_number: int) -> list[dict[str, Any]]:
    """After round `round_number` of successive halving: the next round's configurations
    (`halving.prune`, which tags the others pruned); skipped (so is the next round) without
    halving, after the last round, or when no configuration finished this one."""
    from airflow.sdk.exceptions import AirflowSkipException

    from leukemia import halving, selection, tracking

    runs = selection.round_runs(tracking.setup(), airflow_run_id, round_number)
    onward = halving.prune(runs, round_number)
    if not onward:
        raise AirflowSkipException(f"no round after round {round_number}: nothing to prune")
    return onward


def select_candidate(airflow_run_id: str | None) -> dict[str, Any]:
    """The best run of this DAG run by mean CV macro-F1 (validation macro-F1 when `cv_folds` is 1):
    `{"run_id", "selection", "val", "configurations"}`. Registers nothing; what the gate registers
    is the `run_id` it is given."""
    from airflow.sdk.exceptions import AirflowSkipException

    from leukemia import promotion, selection, tracking

    try:
        return promotion.select_candidate(tracking.setup(), airflow_run_id)
    except selection.NoFinishedRuns:
        raise AirflowSkipException(
            "no configuration finished training: nothing to select (the failed training tasks "
            "say why)"
        ) from None


def refit(
    candidate: dict[str, Any],
    split_info: dict[str, Any],
    features_info: dict[str, Any],
    enabled: bool = True,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train the candidate's configuration again on train + val (`runs.refit_run`) and return
    the candidate with `run_id` the refit run (the one the gate and the registry then see) and
    `selected_run_id` the run selection picked; unchanged when `enabled` is False."""
    from leukemia.runs import refit_run

    selected = candidate.get("selected_run_id") or candidate["run_id"]
    if tags and "airflow_run_id" in tags:  # a retry fails this task's earlier run, not the grid's
        tags = {**tags, "airflow_task_id": "refit"}
    if not enabled:
        log.info("refit is off: the selected run %s itself goes on", selected)
        return {**candidate, "selected_run_id": selected, "refit": False}
    result = refit_run(
        selected,
        split_info["path"],
        split_info["images_uri"],
        features_info["cache_dir"],
        tags=tags,
    )
    return {
        **candidate,
        "run_id": result.run_id,
        "selected_run_id": selected,
        "refit": True,
        "refit_epochs": result.epochs_run,
        "refit_images": result.images,
        "mlflow_url": result.mlflow_url,
        **{f"test_{k}": v for k, v in result.test.items()},
    }


def ensemble(
    candidate: dict[str, Any],
    split_info: dict[str, Any],
    features_info: dict[str, Any],
    top_k: int,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The candidate, or an ensemble run of the top-k heads of this DAG run's grid (ranked as
    selection ranks them, read from MLflow) when it beats the best single head on held-out macro-F1
    (`top_k` below 2: off). Same shape as `candidate`: `run_id` names the run a gate registers;
    `ensemble` says what was compared."""
    from leukemia import selection, tracking
    from leukemia.ensemble import ENSEMBLE, select_ensemble

    if top_k < 2:
        return candidate
    airflow_run_id = (tags or {}).get("airflow_run_id")
    if airflow_run_id:  # a retry fails this task's earlier run, not the grid's
        tags = {**tags, "airflow_task_id": "ensemble"}
    choice = select_ensemble(
        selection.grid_results(tracking.setup(), airflow_run_id),
        split_info["path"],
        features_info["cache_dir"],
        top_k,
        split_info.get("digest", ""),
        tags,
    )
    summary = {k: v for k, v in choice.items() if k != "member_f1_macro"}
    if choice["choice"] != ENSEMBLE:
        return {**candidate, "ensemble": summary}
    return {**candidate, "run_id": choice["run_id"], "ensemble": summary}


def fine_tune(
    candidate: dict[str, Any],
    split_info: dict[str, Any],
    request: RunDefaults = RUN_DEFAULTS,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The candidate, or its fine-tuned run when that scores higher on validation
    (`finetune.fine_tune_candidate`, as `request`'s `fine_tune_*` settings ask). Off unless
    `request.fine_tune`."""
    from leukemia.finetune import FineTuneConfig, fine_tune_candidate

    if not request.fine_tune:
        return candidate
    if tags and "airflow_run_id" in tags:  # a retry fails this task's earlier run, not the grid's
        tags = {**tags, "airflow_task_id": "fine_tune"}
    ft = FineTuneConfig.of(request)
    return fine_tune_candidate(candidate, split_info["path"], split_info["images_uri"], ft, tags)


def audit(
    candidate: dict[str, Any],
    split_info: dict[str, Any],
    images: int = RUN_DEFAULTS.audit_images,
) -> dict[str, Any]:
    """The candidate with `audit`: the shortcut audit of the run the gate will register
    (`audit.audit_run` on `candidate["run_id"]`), a small summary (None when `images` is 0)."""
    from leukemia.audit import audit_run

    summary = audit_run(candidate["run_id"], split_info["path"], split_info["images_uri"], images)
    return {**candidate, "audit": summary}


def register_and_gate(
    selected: dict[str, Any],
    split_info: dict[str, Any],
    request: RunRequest,
    airflow_run_id: str | None,
) -> dict[str, Any]:
    """Log the full model of `selected["run_id"]`, register it without an alias, evaluate it and
    the champion on the split's test images with MLflow and check the thresholds; write its card.

    Never moves an alias: any error fails the task with `@champion` unchanged.
    """
    from leukemia import promotion

    return promotion.register_and_gate(selected, split_info, request.thresholds(), airflow_run_id)


def decide(
    gated: dict[str, Any], review: dict[str, Any] | None, task_id: str, source: str
) -> dict[str, Any]:
    """A decision task (`promote`, `keep_champion`, `reject`): apply the approval task's review,
    which must have chosen this task; `@champion` moves only in `promote`, through the registry."""
    from leukemia import promotion

    return promotion.decide_step(gated, review, task_id, source)


def report(
    results: list[dict[str, Any]],
    gated: dict[str, Any] | None,
    airflow_run_id: str | None = None,
    work: str | None = None,
    require_approval: bool = False,
) -> dict[str, Any]:
    """The grid's summary MLflow run (also made when the gate failed) with the gate's report
    (`gate.md`, one line per threshold), and its table as
    `reports/<airflow run id>/grid_results.json` in the work store."""
    from leukemia import promotion as decisions
    from leukemia.halving import outcomes
    from leukemia.objectstore import open_store
    from leukemia.selection import with_selected_run
    from leukemia.tracking import grid_rows, log_grid_summary

    results = outcomes(results)  # with halving: the runs' final outcomes, or where they stopped
    promotion = decisions.summary_of(gated, require_approval)
    summary = log_grid_summary(results, with_selected_run(promotion), airflow_run_id)
    decisions.annotate_summary(summary["summary_run_id"], gated, require_approval)
    if work:
        chosen = promotion or {}
        table = {
            "rows": grid_rows(results, summary.get("selected_run_id") or chosen.get("run_id")),
            "promotion": promotion,
            "gate": decisions.report_markdown(gated, require_approval).splitlines(),
        }
        name = f"reports/{airflow_run_id or summary['summary_run_id']}/grid_results.json"
        summary["report_uri"] = open_store(work).write_bytes(
            name, json.dumps(table, indent=1, sort_keys=True).encode()
        )
    return summary


def mapped_items(values: Sequence[Any]) -> list[Any]:
    """The values of a mapped task's results, read by index after one count (iterating Airflow's
    lazy sequence reads until a missing offset, which the task log shows as 'XCom not found')."""
    return [values[i] for i in range(len(values))]


def run_tags(ti: Any = None) -> dict[str, str]:
    """The Airflow identity of a task instance (default: the running one), as tags of the MLflow
    runs it starts."""
    if ti is None:
        from airflow.sdk import get_current_context

        ti = get_current_context()["ti"]
    return {
        "airflow_dag_id": ti.dag_id,
        "airflow_run_id": ti.run_id,
        "airflow_map_index": str(ti.map_index),
    }


def current_request() -> RunRequest:
    """The running task's `RunRequest`; a conf that loosens the deployment's policy fails the task
    at once, without retries (it would fail the same way again)."""
    from airflow.sdk import get_current_context

    from leukemia.policy import PolicyViolation

    with fail_at_once(PolicyViolation):
        return RunRequest.from_params(get_current_context()["params"])


@contextmanager
def fail_at_once(*errors: type[Exception]) -> Iterator[None]:
    """Turn `errors` (a setting a retry cannot fix) into Airflow's no-retry failure, in one line."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except errors as exc:
        raise AirflowFailException(str(exc)) from None


def decide_in_task(gated: dict[str, Any], task_id: str) -> dict[str, Any]:
    """`decide` in the running decision task, with the approval task's review (or the gate's)."""
    from airflow.sdk import get_current_context

    ti = get_current_context()["ti"]
    review = ti.xcom_pull(task_ids="approval", key="review")
    return decide(gated, review, task_id, f"{ti.dag_id}/{ti.run_id}")
