"""The registered model's one home: champion lookup, registration, moving `@champion` and its
history, and verified loading.

Everything that asks "which model is live?" or moves an alias comes here; `move_champion` is the one
place `@champion` moves, and it records each move on the registered model (MLflow keeps no alias
history), refuses a version that failed the promotion gate (`gate.py`) or that a reviewer rejected,
and verifies the version's file first. Two rules hold throughout:

- **Fail closed.** Only MLflow's "not found" means "no champion"; any other error while reading the
  registry (a 503, a network failure, a permission error) is raised, so the Airflow task retries and
  no alias moves on a guess.
- **Load only what was promoted.** A model is loaded only from its `.keras` file, with Keras'
  `safe_mode`, never through an exported TensorFlow SavedModel (an uploaded `MLmodel` could ask for
  one). At promotion the file's sha256 is recorded on the version (`model_sha256`); every load of a
  registered version checks it and refuses a mismatch in one line.
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from leukemia.config import env, mlflow_identity, tracking_uri, training_identity
from leukemia.errors import first_line

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
#: Where `mlflow.keras.log_model` keeps the Keras file inside a logged model's folder.
MODEL_FILE = "data/model.keras"
SHA256_TAG = "model_sha256"
#: The MLflow login that registered the version (`config.mlflow_identity`), checked on every load.
REGISTERED_BY_TAG = "registered_by"
#: The registered version's `shortcut_warnings` when its run was never audited.
NOT_AUDITED = (
    "not audited: the run has no shortcut audit (audit_images 0, or the audit task failed)"
)
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")


class ModelError(RuntimeError):
    """Something the user must fix before a model can be used; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class NoChampionError(ModelError):
    """The registered model or its alias does not exist yet (the training DAG has not promoted one)."""


class RegistryUnavailable(ModelError):
    """The registry could not be read (server down, 5xx, permissions): never read as "no champion"."""


class ModelVerificationError(ModelError):
    """A model's files are not what was promoted, or not a plain `.keras` model."""


class ChampionMissing(ModelError):
    """`@champion` is gone although the alias history records one: deleted, never "no champion"."""


def model_name(name: str | None = None) -> str:
    """The registered model's name: `name`, else `LEUKEMIA_MODEL_NAME`."""
    return name or env("LEUKEMIA_MODEL_NAME")


def default_model_uri(name: str | None = None) -> str:
    """`models:/<LEUKEMIA_MODEL_NAME>@champion`."""
    return f"models:/{model_name(name)}@{CHAMPION}"


def client() -> Any:
    """An MLflow client on the configured tracking URI."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


# --- which version is live ------------------------------------------------------------------------


def is_not_found(exc: BaseException) -> bool:
    """True only when MLflow says the registered model, version or alias does not exist."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    code = getattr(exc, "error_code", "")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    # SQL and file stores answer an unknown alias with INVALID_PARAMETER_VALUE "... not found"
    return code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc).lower()


def _by_alias(name: str, alias: str) -> Any | None:
    """The version an alias points to; None when it does not exist; RegistryUnavailable otherwise."""
    try:
        return client().get_model_version_by_alias(name, alias)
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise RegistryUnavailable(
            f"cannot read @{alias} of {name} from MLflow at {tracking_uri()}: {first_line(exc)}"
        ) from exc


def current_champion(name: str | None = None) -> Any | None:
    """The model version `@champion` points to; None only when there never was one (fails closed).

    When the alias is gone but its history records a champion, the alias was deleted (or a move
    stopped half-way): `ChampionMissing`, never "no champion yet", so scoring, the gate and
    `predict` stop instead of skipping or gating against nothing.
    """
    name = model_name(name)
    version = _by_alias(name, CHAMPION)
    if version is None:
        missing = champion_missing(name)
        if missing is not None:
            raise missing
    return version


def champion_missing(name: str) -> ChampionMissing | None:
    """The error for a `@champion` that the history says should exist, or None when none was."""
    moves = history(name)
    if not moves:
        return None
    last = moves[-1]
    # a move recorded but not completed left the alias where it was: on the version it came from
    expected = last.to_version if last.completed else last.from_version
    if not expected:
        return None  # the first promotion stopped before the alias moved: never a champion
    return ChampionMissing(
        f"@champion of {name} is gone, but its history records v{expected} as champion "
        f"(moved {last.at} by {last.by}): the alias was deleted outside the pipeline. Nothing "
        "is scored or gated until it is restored: `python -m leukemia champion rollback --to "
        f"{expected} --reason '...'` (after checking who removed it)"
    )


def champion_digest(name: str | None = None) -> str | None:
    """The dataset digest the current champion was trained on (None without a champion)."""
    version = current_champion(name)
    return version.tags.get("dataset_digest") if version is not None else None


# --- resolving a model URI ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model URI resolved against the registry (small: fits in XCom).

    `pinned_uri` names exactly one model version (`models:/<name>/<version>`) when the URI was a
    registry URI, so that a run keeps using the same model even if the alias moves meanwhile.
    """

    uri: str
    pinned_uri: str
    name: str = ""
    version: str = ""

    @property
    def label(self) -> str:
        """What predictions report as their model version: the registry version, else the URI."""
        return self.version or self.uri

    def describe(self) -> str:
        return f"{self.name} v{self.version} ({self.uri})" if self.version else self.uri


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when the tracking server cannot be reached or the store is missing.

    MLflow's own client retries an unreachable server with backoff for minutes before it gives up.
    """
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            raise NoChampionError(
                f"no MLflow database at {path}: run the training DAG first (it creates the store "
                "and registers the model), or set MLFLOW_TRACKING_URI to your tracking server"
            )
        return
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise RegistryUnavailable(
            f"cannot reach MLflow at {uri}: {reason}. Start the tracking server or set "
            "MLFLOW_TRACKING_URI to one that is up"
        ) from None


def is_unreachable(exc: BaseException) -> bool:
    """True for connection failures, whether raised by requests or wrapped by MLflow's client."""
    import requests

    if isinstance(
        exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)
    ):
        return True
    text = str(exc)
    return "API request to" in text and ("Max retries exceeded" in text or "Connection" in text)


def _find_version(name: str, alias: str | None, version: str | None) -> Any:
    """The model version an alias, number or (deprecated) stage names; MLflow's errors as raised."""
    mlflow_client = client()
    if alias is not None:
        return mlflow_client.get_model_version_by_alias(name, alias)
    if str(version).isdigit():
        return mlflow_client.get_model_version(name, version)
    latest = mlflow_client.get_latest_versions(name, [version])  # a stage, e.g. Production
    if not latest:
        raise NoChampionError(f"registered model {name} has no version in stage {version}")
    return latest[0]


def resolve_model(model_uri: str | None = None) -> ModelRef:
    """Resolve `model_uri` (default: the champion) to a model version, without loading TensorFlow."""
    uri = model_uri or default_model_uri()
    server = tracking_uri()
    if not uri.startswith(("models:/", "runs:/")):
        return ModelRef(uri=uri, pinned_uri=uri)  # a local folder or an artifact-store URI
    check_tracking_server(server)
    match = _MODELS_URI.match(uri)
    if match is None or (match["alias"] is None and match["version"] is None):
        return ModelRef(uri=uri, pinned_uri=uri)  # runs:/ or a logged-model id
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        found = _find_version(name, alias, version)
    except ModelError:
        raise
    except Exception as exc:
        raise _resolve_error(exc, name, alias, version, uri, server) from None
    return ModelRef(
        uri=uri, pinned_uri=f"models:/{name}/{found.version}", name=name, version=str(found.version)
    )


def resolve_served(model_uri: str | None = None) -> ModelRef:
    """What may write to the shared prediction store: a registered version of the pipeline's model
    (`@alias` or a version number) that passed the promotion gate, or was champion before; default
    the champion. Any other URI (`runs:/`, `models:/m-…`, a path, another model, a rejected or
    ungated version) is refused in one line; loading the version then checks who registered it and
    its sha256 (`load_keras`)."""
    name = model_name()
    uri = model_uri or default_model_uri(name)
    match = _MODELS_URI.match(uri)
    registered = match is not None and match["name"] == name
    if not registered or (match["alias"] is None and not str(match["version"]).isdigit()):
        raise ModelVerificationError(
            f"scoring writes predictions only from registered versions of {name} that passed "
            f"the promotion gate (models:/{name}@champion, @challenger or /<version>), not "
            f"{uri}: try other models with `python -m leukemia predict --model {uri}`, which "
            "never writes to the shared prediction store"
        )
    ref = resolve_model(uri)
    version = registered_version(ref)
    refused = refusal(version, "rollback", name)  # passed the gate, or champion before
    if refused:
        raise ModelVerificationError(f"not scored with it: {refused}")
    return ref


def _resolve_error(
    exc: Exception, name: str, alias: str | None, version: str | None, uri: str, server: str
) -> ModelError:
    """The one-line error for a model URI that did not resolve."""
    if is_unreachable(exc):
        return RegistryUnavailable(f"cannot reach MLflow at {server}: {first_line(exc)}")
    if is_not_found(exc) and "Registered Model" in str(exc):
        return NoChampionError(
            f"registered model {name} does not exist in MLflow at {server}: run the training "
            "DAG (leukemia_training) first, or pass --model with another model URI"
        )
    missing = champion_missing(name) if is_not_found(exc) and alias == CHAMPION else None
    if missing is not None:
        return missing
    if is_not_found(exc):
        what = f"has alias {alias}" if alias is not None else f"is version {version}"
        return NoChampionError(
            f"no model version {what} in {name} (MLflow at {server}): run the training DAG "
            "(leukemia_training) first, or pass --model with another model URI"
        )
    return RegistryUnavailable(f"MLflow at {server} failed to resolve {uri}: {first_line(exc)}")


# --- loading what was promoted, and nothing else ---------------------------------------------------


def keras_file(folder: str | Path, uri: str) -> Path:
    """The `.keras` file of a downloaded MLflow Keras model; refuses any other format."""
    import yaml

    folder = Path(folder)
    try:
        flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["keras"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ModelVerificationError(
            f"{uri} is not an MLflow Keras model ({first_line(exc)}): pass a model logged by the "
            "training DAG"
        ) from None
    path = folder / str(flavor.get("data", "data")) / "model.keras"
    if flavor.get("save_exported_model") or not path.is_file():
        raise ModelVerificationError(
            f"{uri} is not a plain .keras model (exported SavedModels are never loaded, they "
            "can run arbitrary graph code): register a model logged by the training DAG"
        )
    return path


def download_model(uri: str) -> Path:
    """Download a logged model's files (any MLflow model URI) and return the local folder."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def registered_version(ref: ModelRef) -> Any:
    """The MLflow model version `ref` names (with its tags); RegistryUnavailable when unreadable."""
    try:
        return client().get_model_version(ref.name, ref.version)
    except Exception as exc:
        raise RegistryUnavailable(
            f"cannot read {ref.name} v{ref.version} from MLflow: {first_line(exc)}"
        ) from exc


def expected_sha256(ref: ModelRef) -> str | None:
    """The sha256 recorded on a registered version; None for URIs outside the registry."""
    if not ref.version:
        return None
    version = registered_version(ref)
    check_registered_by(version, ref.name)
    recorded = version.tags.get(SHA256_TAG)
    if not recorded:
        raise ModelVerificationError(
            f"{ref.name} v{ref.version} has no recorded {SHA256_TAG}: it was not registered by "
            "the training DAG's promotion, so it is not loaded; promote a model with the DAG"
        )
    return recorded


def check_registered_by(version: Any, name: str) -> None:
    """Refuse, in one line, a version that the training login did not register.

    The training DAG's registration records its MLflow login on the version (`registered_by`,
    `record_sha256`); only logins that may edit the registered model (the training user and the
    admin, docker/mlflow/setup_users.py) can write that tag, so a version added by anyone else,
    or by hand, is never loaded or promoted.
    """
    who, expected = version.tags.get(REGISTERED_BY_TAG, ""), training_identity()
    if who != expected:
        by = f"by {who}" if who else f"without a {REGISTERED_BY_TAG} tag (by hand, or before it)"
        raise ModelVerificationError(
            f"{name} v{version.version} was registered {by}, not by the training login "
            f"{expected!r} (LEUKEMIA_TRAINING_MLFLOW_USERNAME): it is never loaded or promoted; "
            "register and promote models only through the training DAG"
        )


def verified_file(ref: ModelRef) -> Path:
    """The downloaded `.keras` file of `ref`, after its sha256 matched the one recorded at
    registration (refused in one line otherwise)."""
    from leukemia.dataset import file_sha256

    expected = expected_sha256(ref)
    path = keras_file(download_model(ref.pinned_uri), ref.pinned_uri)
    actual = file_sha256(path)
    if expected is not None and actual != expected:
        raise ModelVerificationError(
            f"{ref.describe()}: model file sha256 {actual[:12]}… differs from the {expected[:12]}… "
            "recorded at promotion; the artifact was changed after promotion: do not use it, "
            "promote a model again"
        )
    return path


def load_keras(ref: ModelRef) -> Any:
    """The Keras model behind `ref`, loaded with safe_mode after its file passed verification."""
    import keras

    return keras.saving.load_model(verified_file(ref), safe_mode=True)


def version_ref(name: str, version: str) -> ModelRef:
    """The `ModelRef` of one registered version."""
    uri = f"models:/{name}/{version}"
    return ModelRef(uri, uri, name, str(version))


def cannot_serve(exc: BaseException) -> bool:
    """True when a champion can never serve again: its files are gone or fail verification."""
    if isinstance(exc, (FileNotFoundError, ModelVerificationError)):
        return True
    return is_not_found(exc)


# --- registering a candidate ---------------------------------------------------------------------

#: Version tags the promotion writes (the gate adds `gate` and `gate.<check>`; see `gate.py`).
DECISION_TAG, GATE_TAG = "decision", "gate"
#: Registered-model tags that record each move of @champion: MLflow keeps no alias history.
MOVE_TAG_PREFIX = "champion_move."


@dataclass
class Candidate:
    """A selected training run and the version it is registered as (small: fits in XCom).

    Registered with its sha256 recorded, but no alias: only `move_champion` moves `@champion`.
    """

    name: str
    version: str
    run_id: str
    experiment_id: str
    selection: str
    metrics: dict[str, float]


def version_of_run(name: str, run_id: str) -> Any | None:
    """The version already registered from `run_id` (a retried promotion reuses it), or None."""
    mlflow_client = client()
    found = mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not found:
        return None
    first = min(found, key=lambda v: int(v.version))
    return mlflow_client.get_model_version(name, first.version)  # search results carry no aliases


def register_once(name: str, model_uri: str, run_id: str) -> Any:
    """Register the run's model, or return the version an earlier attempt registered; wait for READY."""
    import mlflow

    existing = version_of_run(name, run_id)
    if existing is not None:
        log.info(
            "Run %s is already registered as %s v%s: reusing it", run_id, name, existing.version
        )
        return existing
    return mlflow.register_model(model_uri, name, await_registration_for=300)


def record_sha256(name: str, version: str) -> str:
    """Hash the registered version's `.keras` file and record it on the version with the MLflow
    login that registered it (`registered_by`), once: a retry keeps the first hash, so a file
    changed between attempts is refused rather than blessed."""
    from leukemia.dataset import file_sha256

    tags = client().get_model_version(name, version).tags
    if not tags.get(REGISTERED_BY_TAG):
        client().set_model_version_tag(name, version, REGISTERED_BY_TAG, mlflow_identity())
    recorded = tags.get(SHA256_TAG)
    if recorded:
        return recorded
    uri = f"models:/{name}/{version}"
    digest = file_sha256(keras_file(download_model(uri), uri))
    client().set_model_version_tag(name, version, SHA256_TAG, digest)
    return digest


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    """Set several tags on one model version."""
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)


def register_candidate(
    run_id: str,
    split_path: str | Path,
    images_dir: str | Path,
    airflow_run_id: str | None = None,
    selection: str = "",
    name: str | None = None,
) -> Candidate:
    """Log the full model of the selected training run and register it, without an alias.

    `split_path` and `images_dir` are paths or URIs (the work store's split, the `s3://` prefix of
    the images): the full model's prediction grid reads test images from there
    (`tracking.log_full_model`, done only for the run that is registered). The version is tagged
    with the run's dataset digest, configuration, metrics and calibration (its `calibration_*`
    tags: the temperature inside the model and the conformal threshold scoring reads with
    `calibration.Calibration.from_tags`), and its file's sha256 is recorded.
    Idempotent: a retry reuses the model an earlier attempt logged and the version it registered.
    """
    import mlflow

    from leukemia.calibration import TAG_PREFIX
    from leukemia.tracking import SHORTCUT_TAG, log_full_model, setup

    name = model_name(name)
    experiment_id = setup()
    run = mlflow.MlflowClient().get_run(run_id)
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("val_", "test_"))}
    model_uri = log_full_model(run_id, images_dir, split_path)
    version = str(register_once(name, model_uri, run_id).version)
    selection = selection or f"run {run_id}"
    tag_version(
        name,
        version,
        {
            "dataset_digest": run.data.tags.get("dataset_digest", ""),
            "config": run.data.tags.get("config", ""),
            "airflow_run_id": airflow_run_id or "",
            "run_id": run_id,
            "selection": selection,
            **{k: f"{v:.4f}" for k, v in metrics.items()},
            # the shortcut audit goes with the model: its warnings ("" none) and numbers
            SHORTCUT_TAG: run.data.tags.get(SHORTCUT_TAG, NOT_AUDITED),
            **{k: f"{v:.4f}" for k, v in run.data.metrics.items() if k.startswith("audit_")},
            # the calibration goes with the model: scoring's prediction sets need its threshold
            **{k: v for k, v in run.data.tags.items() if k.startswith(TAG_PREFIX)},
        },
    )
    record_sha256(name, version)
    log.info("Registered %s v%s from run %s: %s", name, version, run_id, selection)
    return Candidate(name, version, run_id, experiment_id, selection, metrics)


# --- moving @champion, and its history ------------------------------------------------------------


@dataclass(frozen=True)
class AliasMove:
    """One move of `@champion`: when, from which version to which, why, and who or what moved it."""

    at: str
    from_version: str
    to_version: str
    kind: str  # promotion | rollback
    reason: str
    by: str
    source: str  # the Airflow DAG run, or the command line and host
    #: False from recording the move until the alias has moved (records before this field: moved)
    completed: bool = True

    def describe(self) -> str:
        """One line: `2026-11-27 12:45  v1 → v2  promotion by dr-lee (source): …`."""
        start = f"v{self.from_version}" if self.from_version else "–"
        return (
            f"{self.at[:19].replace('T', ' ')}  {start} → v{self.to_version}  {self.kind} by "
            f"{self.by} ({self.source}): {self.reason}"
        )


def history(name: str | None = None) -> list[AliasMove]:
    """Every recorded move of `@champion`, oldest first (fails closed like the champion lookup)."""
    return [move for _, move in _recorded_moves(model_name(name))]


def _recorded_moves(name: str) -> list[tuple[str, AliasMove]]:
    """(tag key, move) of every recorded move of `@champion`, oldest first."""
    import json

    try:
        tags = client().get_registered_model(name).tags
    except Exception as exc:
        if is_not_found(exc):
            return []
        raise RegistryUnavailable(
            f"cannot read {name} from MLflow at {tracking_uri()}: {first_line(exc)}"
        ) from exc
    moves = [
        (key, AliasMove(**json.loads(value)))
        for key, value in sorted(tags.items())
        if key.startswith(MOVE_TAG_PREFIX)
    ]
    return sorted(moves, key=lambda item: item[1].at)


def refusal(version: Any, kind: str, name: str) -> str | None:
    """Why `version` may not become champion by a move of this kind, or None when it may.

    A version that failed the gate or that a reviewer rejected never may; a promotion needs the
    gate's pass; a rollback needs the gate's pass or an earlier turn as champion.
    """
    tags, number = version.tags, str(version.version)
    if tags.get(GATE_TAG) == "failed":
        failed = "; ".join(
            v for k, v in sorted(tags.items()) if k.startswith("gate.") and v.startswith("failed")
        )
        return f"{name} v{number} failed the promotion gate ({failed}): it can never be champion"
    if tags.get(DECISION_TAG) == "rejected":
        return (
            f"{name} v{number} was rejected by {tags.get('decided_by', 'a reviewer')}: it can "
            "never be champion; train and promote a new model"
        )
    if tags.get(GATE_TAG) == "passed":
        return None
    if kind == "rollback" and any(m.to_version == number for m in history(name)):
        return None
    return (
        f"{name} v{number} has not passed the promotion gate: promote it through the training "
        "DAG (leukemia_training), or roll back to a version that was champion before"
    )


def move_champion(
    to_version: str,
    kind: str,
    reason: str,
    by: str,
    source: str,
    name: str | None = None,
) -> AliasMove:
    """Point `@champion` at `to_version` and record the move: the one place `@champion` moves.

    Fails closed: the version must be allowed (`refusal`) and its model file must match the sha256
    recorded at registration; any registry error is raised. The move is recorded before the alias
    moves, so no move goes unrecorded. Idempotent: a retry from the same source completes or
    returns the move its earlier attempt recorded, without recording it twice.
    """
    import json
    from datetime import UTC, datetime

    name, to_version = model_name(name), str(to_version)
    mlflow_client = client()
    try:
        version = mlflow_client.get_model_version(name, to_version)
    except Exception as exc:
        if is_not_found(exc):
            raise NoChampionError(
                f"{name} has no version {to_version} in MLflow at {tracking_uri()}: "
                "`python -m leukemia champion history` lists the versions that were champion"
            ) from None
        raise RegistryUnavailable(
            f"cannot read {name} v{to_version} from MLflow at {tracking_uri()}: {first_line(exc)}"
        ) from exc
    reason_refused = refusal(version, kind, name)
    if reason_refused:
        raise ModelVerificationError(reason_refused)
    verified_file(version_ref(name, to_version))
    current = _by_alias(name, CHAMPION)  # a deleted alias is restored by this move
    from_version = str(current.version) if current is not None else ""
    recorded = _recorded_moves(name)
    last_key, last = recorded[-1] if recorded else ("", None)
    if last is not None and (last.to_version, last.source, last.reason) != (
        to_version,
        source,
        reason,
    ):
        last = None  # the last recorded move is not this one (a retry repeats all three)
    if from_version == to_version:
        if last is not None:
            log.info("@champion already points to v%s (moved by %s)", to_version, source)
            return _complete(mlflow_client, name, last_key, last)
        raise ValueError(f"{name} v{to_version} is already @champion: nothing to move")
    if last is not None and last.from_version == from_version:
        move, key = last, last_key  # recorded by an attempt stopped before the alias moved
        log.info("Completing the move recorded at %s", move.at)
    else:
        now = datetime.now(UTC)
        move = AliasMove(
            now.isoformat(timespec="seconds"),
            from_version,
            to_version,
            kind,
            reason,
            by,
            source,
            completed=False,
        )
        key = f"{MOVE_TAG_PREFIX}{now.strftime('%Y%m%dT%H%M%S.%fZ')}"
        mlflow_client.set_registered_model_tag(name, key, json.dumps(asdict(move)))
    mlflow_client.set_registered_model_alias(name, CHAMPION, to_version)
    move = _complete(mlflow_client, name, key, move)
    log.info("@champion of %s: %s", name, move.describe())
    return move


def _complete(mlflow_client: Any, name: str, key: str, move: AliasMove) -> AliasMove:
    """Mark a recorded move as done once the alias points where it says (a no-op when it is)."""
    import json

    if move.completed:
        return move
    done = replace(move, completed=True)
    mlflow_client.set_registered_model_tag(name, key, json.dumps(asdict(done)))
    return done


def rollback(
    to_version: str, reason: str, by: str, source: str, name: str | None = None
) -> AliasMove:
    """Move `@champion` back to an earlier version (its file verified), and record why."""
    if not reason.strip():
        raise ValueError("a rollback needs a reason: say why the current champion goes")
    return move_champion(to_version, "rollback", reason, by, source, name)


def set_challenger(version: str, name: str | None = None) -> None:
    """Point `@challenger` at a version that passed the gate but did not become champion."""
    client().set_registered_model_alias(model_name(name), CHALLENGER, str(version))
