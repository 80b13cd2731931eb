"""The DAGs: import cleanly and fast, policy, structure, and full runs on the embedded stack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leukemia.dev.demo import DEMO_POLICY

ROOT = Path(__file__).resolve().parents[1]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))


@pytest.fixture(scope="module")
def dagbag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_dagbag_imports_without_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert {
        "leukemia_training",
        "leukemia_ingest",
        "leukemia_scoring",
        "leukemia_champion",
    } <= set(dagbag.dags)


#: Parses each DAG file given in argv in a child forked after Airflow's import (so the timing is
#: the file's own cost, and each file starts from the same modules, whatever another file imports):
#: one JSON line per file with its seconds, the heavy modules it left loaded, and any error.
_PARSE_EACH = """
import json, os, runpy, sys, time
import airflow.sdk, airflow.providers.amazon.aws.hooks.s3
HEAVY = ('tensorflow', 'keras', 'mlflow', 'sklearn', 'matplotlib')
for path in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        started, error = time.perf_counter(), ''
        try:
            runpy.run_path(path)
        except BaseException as exc:
            error = repr(exc)
        found = {'path': path, 'seconds': time.perf_counter() - started, 'error': error,
                 'heavy': [m for m in HEAVY if m in sys.modules]}
        os.write(write, json.dumps(found).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        print(answer.read(), flush=True)
    os.wait()
"""


@pytest.fixture(scope="module")
def parsed_alone() -> dict[str, dict[str, Any]]:
    """`_PARSE_EACH` over every DAG file: one Python process, one fork per file."""
    out = subprocess.run(
        [sys.executable, "-c", _PARSE_EACH, *map(str, DAG_FILES)],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    found = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {Path(f["path"]).name: f for f in found}


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parses_fast_without_heavy_imports(
    path: Path, parsed_alone: dict[str, dict[str, Any]]
) -> None:
    found = parsed_alone[path.name]
    assert found["error"] == ""
    assert found["heavy"] == [], f"{path.name} imports {found['heavy']} at parse time"
    assert found["seconds"] < 2.0


def test_policy(dagbag: Any) -> None:
    for dag in dagbag.dags.values():
        assert "leukemia" in dag.tags
        assert dag.doc_md and dag.catchup is False
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag.dag_id}.{task.task_id} has no retries"


def test_every_param_of_every_dag_declares_draft07_and_still_refuses_a_bad_value(
    dagbag: Any,
) -> None:
    """The dialect `tasks.params.param` declares (cheaper to validate than jsonschema's default),
    with the bounds and enums still enforced under it."""
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamValidationError

    from leukemia.tasks.params import DIALECT

    for dag in dagbag.dags.values():
        for name in dag.params:
            schema = dag.params.get_param(name).schema
            assert schema.get("$schema") == DIALECT, f"{dag.dag_id}: Param {name}"
    training = dagbag.dags["leukemia_training"].params
    for name, bad in (("fine_tune_blocks", 6), ("precision", "fp8"), ("conformal_coverage", 1.0)):
        with pytest.raises(ParamValidationError):
            Param(None, schema=training.get_param(name).schema).resolve(bad)
    assert Param(None, schema=training.get_param("fine_tune_blocks").schema).resolve(5) == 5


def test_training_dag_structure(dagbag: Any) -> None:
    dag = dagbag.dags["leukemia_training"]
    edges = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert edges == {
        "sync_images": ["build_split"],
        "build_split": [
            "audit",
            "data_changed",
            "ensemble",
            "extract_features",
            "fine_tune",
            "plan_extraction",
            "refit",
            "train",
            "train_round2",
            "train_round3",
        ],
        "data_changed": ["plan_extraction", "plan_grid"],
        "plan_extraction": ["extract_features"],
        "extract_features": ["ensemble", "refit", "train", "train_round2", "train_round3"],
        "plan_grid": ["train"],
        # successive halving's rounds (`halving`): each round's survivors, picked by prune
        "train": ["prune_round1", "report", "select_candidate"],
        "prune_round1": ["train_round2"],
        "train_round2": ["prune_round2", "select_candidate"],
        "prune_round2": ["train_round3"],
        "train_round3": ["select_candidate"],
        "select_candidate": ["refit"],
        "refit": ["ensemble"],
        "ensemble": ["fine_tune"],
        "fine_tune": ["audit"],
        "audit": ["register_and_gate"],
        "register_and_gate": ["approval", "keep_champion", "promote", "reject", "report"],
        "approval": ["keep_champion", "promote", "reject"],
        "promote": [],
        "keep_champion": [],
        "reject": [],
        "report": [],
    }
    train = dag.get_task("train")
    assert train.max_active_tis_per_dagrun == 1
    assert train.map_index_template == "{{ config_label }}"
    for later in ("train_round2", "train_round3"):  # the same task, named by configuration
        assert dag.get_task(later).map_index_template == "{{ config_label }}"
        assert dag.get_task(later).queue == train.queue
    assert {dag.get_task(f"prune_round{n}").trigger_rule for n in (1, 2)} == {"all_done"}
    extract = dag.get_task("extract_features")
    assert extract.map_index_template == "{{ shard_label }}"  # mapped over shards of the images
    assert extract.queue == train.queue
    assert dag.get_task("fine_tune").queue == train.queue  # the heavy optional stage: a GPU worker
    assert dag.get_task("sync_images").retry_exponential_backoff
    assert [o.name for o in dag.get_task("promote").outlets] == ["leukemia_champion"]
    assert not dag.get_task("keep_champion").outlets and not dag.get_task("reject").outlets
    assert not dag.get_task("register_and_gate").outlets  # the gate never moves the alias
    approval = dag.get_task("approval")
    assert approval.options == ["Promote", "Keep the champion", "Reject"]
    assert approval.defaults == ["Keep the champion"]  # what no answer in time chooses
    assert approval.options_mapping == {
        "Promote": "promote",
        "Keep the champion": "keep_champion",
        "Reject": "reject",
    }
    assert list(approval.params) == ["comment"]
    # the refit trains on the training queue; an error there fails closed (nothing is gated)
    assert dag.get_task("refit").queue == train.queue
    assert dag.get_task("refit").trigger_rule == "all_success"
    assert dag.get_task("ensemble").trigger_rule == "all_success"  # no candidate: not run
    assert "AssetOrTimeSchedule" in type(dag.timetable).__name__
    params = dag.params.dump()
    assert params["optimizers"] == ["adam", "sgd", "rmsprop"] and params["batch_sizes"] == [
        16,
        32,
        64,
    ]
    assert params["force_retrain"] is False
    assert params["heads"] == ["mlp", "linear"] and params["cv_folds"] == 5 and params["refit"]
    assert params["halving"] is True  # successive halving by default since issue 26


def test_training_dag_params_are_the_declared_settings_and_round_trip_to_the_defaults(
    dagbag: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One declaration (config.RunDefaults) makes the Params, their schema and the typed request."""
    from dataclasses import replace

    from leukemia.config import OPTIMIZERS, PRECISIONS, RUN_DEFAULTS, RunDefaults
    from leukemia.tasks.training_dag import RunRequest

    for name in (
        "LEUKEMIA_WEIGHTS",
        "LEUKEMIA_REQUIRE_APPROVAL",
        "LEUKEMIA_MIN_F1_MACRO",
        "LEUKEMIA_MAX_TEST_ECE",
    ):
        monkeypatch.delenv(name, raising=False)
    params = dagbag.dags["leukemia_training"].params
    declared = RunDefaults.params()
    assert set(params) == {"bucket", "prefix", "conn_id", *declared}
    for name, spec in declared.items():
        assert params.get_param(name).schema["title"] == spec["title"]
    # the Params' defaults convert back to exactly the declared defaults, typed
    request = RunRequest.from_params(params.dump())
    expected = replace(RUN_DEFAULTS, bucket="", prefix="", conn_id="")
    assert {f: getattr(request, f) for f in declared} == {f: getattr(expected, f) for f in declared}
    assert isinstance(request.batch_sizes, tuple) and isinstance(request.batch_sizes[0], int)
    # types and bounds come from the declaration
    schema = {name: params.get_param(name).schema for name in declared}
    assert schema["optimizers"]["items"] == {"type": "string", "enum": list(OPTIMIZERS)}
    assert schema["batch_sizes"]["items"] == {"type": "integer", "minimum": 1}
    assert schema["learning_rate"]["type"] == ["null", "number"]
    assert schema["precision"] == {
        **schema["precision"],
        "type": "string",
        "enum": list(PRECISIONS),
    }
    assert schema["fine_tune_blocks"]["maximum"] == 5 and schema["refit"]["type"] == "boolean"
    assert schema["conformal_coverage"]["exclusiveMinimum"] == 0
    assert schema["conformal_coverage"]["exclusiveMaximum"] == 1
    assert params["conformal_coverage"] == RUN_DEFAULTS.conformal_coverage == 0.95
    # the gate and approval are the deployment's policy: empty by default, floored by its schema
    for name in ("min_f1_macro", "min_malignant_sensitivity", "min_benign_specificity"):
        assert params[name] is None
        assert schema[name]["minimum"] == getattr(RUN_DEFAULTS, name)
    assert params["max_test_ece"] is None  # a maximum: a run may only lower it
    assert schema["max_test_ece"]["maximum"] == RUN_DEFAULTS.max_test_ece == 0.05


def test_a_conf_value_is_converted_to_its_declared_type() -> None:
    from leukemia.tasks.training_dag import RunRequest

    run = RunRequest.from_params(
        {"batch_sizes": ["8", 16.0], "epochs": "3", "learning_rate": "0.01", "refit": 0}
    )
    assert run.batch_sizes == (8, 16) and run.epochs == 3 and run.refit is False
    assert run.learning_rate == 0.01
    assert RunRequest.from_params({"learning_rate": ""}).learning_rate is None


def test_require_approval_param_cannot_switch_off_the_environments_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On in the compose stack (LEUKEMIA_REQUIRE_APPROVAL=true), off in the demo and the tests."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("LEUKEMIA_REQUIRE_APPROVAL", "true")
    bag = DagBag(dag_folder=str(ROOT / "dags" / "leukemia_training.py"))
    schema = bag.dags["leukemia_training"].params.get_param("require_approval").schema
    assert schema["enum"] == [None, True]


def test_champion_dag_rolls_back_and_emits_the_champion_asset(dagbag: Any) -> None:
    dag = dagbag.dags["leukemia_champion"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # only by hand
    assert {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks} == {
        "rollback": ["history"],
        "history": [],
    }
    assert [o.name for o in dag.get_task("rollback").outlets] == ["leukemia_champion"]
    assert set(dag.params.dump()) == {"to_version", "reason"}


def test_mlflow_link_plugin_reads_the_task_result() -> None:
    sys.path.insert(0, str(ROOT / "plugins"))
    from mlflow_links import mlflow_url_from_xcom

    url = "http://mlflow:5000/#/experiments/1/runs/abc"
    assert mlflow_url_from_xcom(json.dumps({"run_id": "abc", "mlflow_url": url})) == url
    assert mlflow_url_from_xcom({"mlflow_url": url}) == url
    assert mlflow_url_from_xcom(None) == "" and mlflow_url_from_xcom("[1, 2]") == ""


def _states(dag: Any, run_id: str) -> dict[str, list[str]]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=dag.dag_id, run_id=run_id).all()
        states: dict[str, list[str]] = {}
        for ti in tis:
            states.setdefault(ti.task_id, []).append(str(ti.state))
        return states


@pytest.fixture()
def worker_per_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every task of `dag.test()` runs as on a worker of its own: a fresh, empty LEUKEMIA_DATA_DIR,
    deleted when the task ends, so no task can read a file that another task left on disk."""
    import airflow.sdk.definitions.dag as dag_module

    real = dag_module._run_task
    ran: list[str] = []

    def on_a_fresh_worker(*, ti: Any, task: Any, **kwargs: Any) -> Any:
        folder = tmp_path / "workers" / f"{len(ran):03d}-{ti.task_id}-{ti.map_index}"
        folder.mkdir(parents=True)
        ran.append(f"{ti.task_id}[{ti.map_index}]")
        os.environ["LEUKEMIA_DATA_DIR"] = str(folder)
        try:
            return real(ti=ti, task=task, **kwargs)
        finally:
            shutil.rmtree(folder)

    monkeypatch.setenv("LEUKEMIA_DATA_DIR", str(tmp_path / "no-task-runs-here"))
    monkeypatch.setattr(dag_module, "_run_task", on_a_fresh_worker)
    yield ran


def _xcoms(dag: Any, run_id: str) -> dict[str, list[Any]]:
    """The return value of each task instance of the run, by task id (in map index order)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(XComModel)
            .filter_by(dag_id=dag.dag_id, run_id=run_id, key="return_value")
            .order_by(XComModel.task_id, XComModel.map_index)
            .all()
        )
        found: dict[str, list[Any]] = {}
        for row in rows:
            value = XComModel.deserialize_value(row)
            while isinstance(value, str):  # stored as JSON text, possibly more than once
                try:
                    value = json.loads(value)
                except ValueError:
                    break  # a plain string
            found.setdefault(row.task_id, []).append(value)
        return found


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


@pytest.mark.slow
def test_training_dag_end_to_end_with_an_empty_local_folder_for_every_task_and_halving_rounds(
    airflow_db: Path,
    dagbag: Any,
    bucket: str,
    mlflow_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    worker_per_task: list[str],
) -> None:
    """Full runs with dag.test(), each task on a fresh worker: train, gate and promote, skip on
    unchanged data, keep a better champion (the candidate, picked by successive halving in rounds,
    gets @challenger); the hand-offs are in the object store and XCom holds no path."""
    import mlflow

    from leukemia import registry, selection, tracking
    from leukemia.dev.synthetic import generate
    from leukemia.objectstore import open_store
    from leukemia.storage import upload_folder

    monkeypatch.setenv("LEUKEMIA_BUCKET", bucket)
    generate(tmp_path / "source", n_per_class=12, size=48, seed=5)
    upload_folder(tmp_path / "source", bucket, "raw/")
    dag = dagbag.dags["leukemia_training"]
    conf = {
        "bucket": bucket,
        "optimizers": ["adam"],
        "batch_sizes": [8],
        "variants": ["seed"],
        "heads": ["mlp", "linear"],
        "cv_folds": 3,
        "halving": False,  # the full grid: every configuration on every fold (the third run halves)
        "epochs": 4,
        "input_size": 48,
        "weights": "none",
        "precision": "float32",
        "extract_shards": 2,
    }
    # four epochs at 48 px: the gate only reports (its thresholds are tested in test_gate); the
    # loose policy comes from the environment, as a deployment's does
    for name, value in DEMO_POLICY.items():
        monkeypatch.setenv(name, value)

    first = dag.test(run_conf=conf)
    assert str(first.state) == "success"
    states = _states(dag, first.run_id)
    assert states["train"] == ["success", "success"]
    assert states["extract_features"] == ["success", "success"]
    assert "extract_features[1]" in worker_per_task and "register_and_gate[-1]" in worker_per_task
    experiment_id = tracking.setup()
    runs = selection.finished_runs(experiment_id, first.run_id)
    assert len(runs) == 2 and {r.data.params["head"] for r in runs} == {"mlp", "linear"}
    assert all("cv_fold3_val_f1_macro" in r.data.metrics for r in runs)
    best = selection.best_run(runs)
    # the registered model is the selected configuration trained again on train + val
    first_xcoms = _xcoms(dag, first.run_id)
    refit = first_xcoms["refit"][0]
    assert refit["selected_run_id"] == best.info.run_id and refit["refit"] is True
    counts = first_xcoms["build_split"][0]["counts"]
    assert refit["refit_images"] == sum(counts["train"].values()) + sum(counts["val"].values())
    champion = registry.current_champion("leukemia-classifier")
    assert champion is not None and champion.run_id == refit["run_id"] != best.info.run_id
    assert mlflow.get_run(champion.run_id).data.tags["refit_of"] == best.info.run_id
    assert champion.tags["airflow_run_id"] == first.run_id and champion.tags["dataset_digest"]
    assert champion.tags["gate"] == "passed" and champion.tags["decided_by"] == "the gate"
    # the audited run's shortcut warnings and numbers go with the registered version
    assert states["audit"] == ["success"]
    audited = mlflow.get_run(champion.run_id)  # the refit: the run the gate registered
    assert champion.tags["shortcut_warnings"] == audited.data.tags["shortcut_warnings"]
    assert float(champion.tags["audit_test_images"]) == sum(counts["test"].values())  # all of it
    assert "audit/shortcut_audit.md" in {
        a.path for a in mlflow.MlflowClient().list_artifacts(champion.run_id, "audit")
    }
    # the drift watch's reference goes with it too: fitted on the refit's train + val features
    assert champion.tags["drift_reference"] == f"runs:/{champion.run_id}/drift"
    reference_files = mlflow.MlflowClient().list_artifacts(champion.run_id, "drift")
    assert {a.path for a in reference_files} == {"drift/reference.npz", "drift/background.npz"}
    assert int(champion.tags["drift_reference_bytes"]) == sum(a.file_size for a in reference_files)
    assert states["promote"] == ["success"] and states["reject"] == ["skipped"]
    # select_candidate chose the best run; the gate registered its refit, the one the XCom names
    assert first_xcoms["select_candidate"][0]["run_id"] == best.info.run_id
    assert first_xcoms["ensemble"][0]["run_id"] == champion.run_id  # ensemble off: passed on
    registry.load_keras(registry.resolve_model())  # the registered full model loads, verified
    assert [m.to_version for m in registry.history()] == [str(champion.version)]
    summary = mlflow.search_runs([experiment_id], "tags.kind = 'summary'", output_format="list")
    assert len(summary) == 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary[0].info.run_id)}
    assert {"grid_comparison.png", "gate.md"} <= artifacts
    report = mlflow.artifacts.load_text(f"runs:/{summary[0].info.run_id}/gate.md")
    assert "- min_malignant_sensitivity: passed: malignant sensitivity" in report
    assert "Next: promoted by the gate: passed every threshold; approval not required" in report

    # the hand-offs are in the work store, and XCom carries their URIs, never a local path
    work = open_store(f"s3://{bucket}/work/").list()
    assert f"sync/{bucket}/raw/sync_manifest.json" in work
    assert sum(k.startswith("splits/split-") for k in work) == 1
    parts = [k for k in work if k.startswith("features/") and k.endswith(".npz")]
    assert sum("/augmented-" not in k for k in parts) == 2  # 2 shards
    # and the augmented copies (2 by default) of the train and val images, by the same 2 shards
    assert sum("/augmented-v1-0/" in k for k in parts) == sum(
        "/augmented-v1-1/" in k for k in parts
    )
    assert sum("/augmented-" in k for k in parts) == 4
    train_val = sum(counts["train"].values()) + sum(counts["val"].values())
    assert sum(x["augmented"] for x in first_xcoms["extract_features"]) == 2 * train_val
    assert {r.data.params["augment_copies"] for r in runs} == {"2"}
    assert {r.data.params["augment_version"] for r in runs} == {"v1"}
    assert f"reports/{first.run_id}/grid_results.json" in work
    xcoms = _xcoms(dag, first.run_id)
    strings = [s for values in xcoms.values() for s in _strings(values)]
    assert xcoms["build_split"][0]["path"].startswith(f"s3://{bucket}/work/splits/")
    assert not [s for s in strings if s.startswith(("/", "file:")) or str(tmp_path) in s]
    assert max(len(json.dumps(v)) for values in xcoms.values() for v in values) < 4000

    second = dag.test(run_conf=conf)  # same images: training is skipped
    assert str(second.state) == "success"
    states = _states(dag, second.run_id)
    assert states["data_changed"] == ["success"]
    assert set(states["train"]) == {"skipped"} and states["register_and_gate"] == ["skipped"]
    assert states["refit"] == ["skipped"]
    assert states["audit"] == ["skipped"]
    assert selection.finished_runs(experiment_id, second.run_id) == []

    # the comparison with the champion only needs a candidate, which successive halving picks
    # (`halving`): both heads fit fold 1 of 3, the better fits folds 2-3 and finishes, the other
    # is pruned; no audit
    halved = {"halving": True, "audit_images": 0}
    third = dag.test(run_conf={**conf, **halved, "force_retrain": True, "promotion_margin": 1.0})
    assert str(third.state) == "success"
    states = _states(dag, third.run_id)
    assert states["train"] == ["success", "success"] and states["train_round2"] == ["success"]
    assert states["prune_round1"] == ["success"]  # 3 folds: two rounds, then nothing to prune
    assert states["prune_round2"] == states["train_round3"] == ["skipped"]
    assert "train_round2[0]" in worker_per_task  # a round's task on a worker of its own too
    extracted = _xcoms(dag, third.run_id)["extract_features"]
    assert [(x["computed"], x["augmented"], x["parts_written"]) for x in extracted] == [
        (0, 0, 0),
        (0, 0, 0),
    ]
    assert sum(x["cached"] for x in extracted) == 48
    finalists = selection.finished_runs(experiment_id, third.run_id)
    assert len(finalists) == 1 and "cv_fold3_val_f1_macro" in finalists[0].data.metrics
    query = f"tags.pruned = 'true' and tags.airflow_run_id = '{third.run_id}'"
    pruned = mlflow.search_runs([experiment_id], query, output_format="list")
    assert len(pruned) == 1 and pruned[0].data.tags["pruned_after_round"] == "1"
    assert pruned[0].data.metrics["pruned_score"] == pytest.approx(
        pruned[0].data.metrics["cv_fold1_val_f1_macro"]
    )
    assert registry.current_champion("leukemia-classifier").version == champion.version
    challenger = mlflow.MlflowClient().get_model_version_by_alias(
        "leukemia-classifier", "challenger"
    )
    assert int(challenger.version) > int(champion.version)
    assert mlflow.get_run(challenger.run_id).data.tags["refit_of"] == finalists[0].info.run_id
    assert challenger.tags["decision"] == "kept as challenger"
    assert "does not beat the champion" in challenger.tags["decision_reason"]
    assert challenger.tags["gate.min_gain_over_champion"].startswith("failed: macro-F1")
    report = json.loads(open_store(f"s3://{bucket}/work/").read_bytes(
        f"reports/{third.run_id}/grid_results.json"
    ))  # fmt: skip
    assert sorted(str(r.get("pruned_after_round", "")) for r in report["rows"]) == ["", "1"]


@pytest.mark.slow
def test_training_dag_fails_once_without_retries_when_weights_cannot_be_had(
    airflow_db: Path,
    dagbag: Any,
    bucket: str,
    mlflow_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing weights file fails plan_extraction on its first try; nothing downstream runs."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    from leukemia import registry, selection, tracking
    from leukemia.dev.synthetic import generate
    from leukemia.storage import upload_folder

    monkeypatch.setenv("LEUKEMIA_BUCKET", bucket)
    generate(tmp_path / "source", n_per_class=3, size=48, seed=6)
    upload_folder(tmp_path / "source", bucket, "raw/")
    dag = dagbag.dags["leukemia_training"]
    missing = tmp_path / "nowhere" / "vgg16_notop.weights.h5"
    conf = {
        "bucket": bucket,
        "optimizers": ["adam"],
        "batch_sizes": [8],
        "variants": ["seed"],
        "epochs": 1,
        "input_size": 48,
        "weights": str(missing),
        "precision": "float32",
    }

    run = dag.test(run_conf=conf)
    assert str(run.state) == "failed"
    states = _states(dag, run.run_id)
    assert states["plan_extraction"] == ["failed"]
    assert set(states["extract_features"]) <= {"upstream_failed"}
    assert set(states["train"]) <= {"upstream_failed"}
    # the rounds' bookkeeping runs after any outcome and finds nothing to prune or select
    assert states["prune_round1"] == states["prune_round2"] == ["skipped"]
    assert states["select_candidate"] == ["skipped"]
    assert states["refit"] == ["upstream_failed"]
    assert states["register_and_gate"] == ["upstream_failed"]
    assert states["audit"] == ["upstream_failed"]
    assert states["promote"] == ["upstream_failed"]
    assert states["report"] == ["upstream_failed"]
    with create_session() as session:
        ti = (
            session.query(TaskInstance)
            .filter_by(dag_id=dag.dag_id, run_id=run.run_id, task_id="plan_extraction")
            .one()
        )
        assert ti.try_number == 1  # AirflowFailException: no retry for a setting
    assert selection.finished_runs(tracking.setup(), run.run_id) == []
    assert registry.current_champion("leukemia-classifier") is None
