"""The steps of the `leukemia_scoring` DAG: pin the model version, score what is new, and announce
the referred images it queued for review (the `leukemia_referrals` asset)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from leukemia.config import scoring_mlflow_login

log = logging.getLogger(__name__)

#: Skipped keys listed in the task's XCom (the full list is in the scoring report).
LISTED_SKIPPED = 20


def champion_or_none(model_uri: str | None = None) -> dict[str, str] | None:
    """The model to score with, pinned to one version; None when no champion exists yet (the
    scoring DAG then skips: the champion asset triggers it again once training promotes one).

    Only a registered version of the pipeline's model that passed the gate may score
    (`registry.resolve_served`); a deleted `@champion` fails the task (`registry.ChampionMissing`).
    """
    from leukemia import registry

    try:
        with scoring_mlflow_login():
            ref = registry.resolve_served(model_uri or None)
    except registry.NoChampionError as exc:
        if model_uri:
            raise
        log.warning("Nothing to score with: %s", exc)
        return None
    return asdict(ref)


def score(
    bucket: str,
    incoming_prefix: str,
    conn_id: str,
    model_uri: str,
    batch_size: int = 32,
    explain: str | bool = "referred",
) -> dict[str, Any]:
    """Score the new images under the prefix with the pinned model; a small summary out (with
    how many images were referred and how many newly queued for review).

    `explain`: `referred`, `all` or `none` (a run conf's older boolean: true → all, false → none).
    Talks to MLflow as the read-only scoring user where one is configured.
    """
    from leukemia.scoring import explain_mode, score_incoming

    with scoring_mlflow_login():
        result = score_incoming(
            bucket=bucket,
            prefix=incoming_prefix,
            conn_id=conn_id,
            model_uri=model_uri,
            batch_size=batch_size,
            explain=explain_mode(explain),
        )
    out = asdict(result)
    out["skipped_keys"] = out["skipped_keys"][:LISTED_SKIPPED]
    return out


def announce_referrals(outlet_events: Any, result: dict[str, Any]) -> bool:
    """Emit a `leukemia_referrals` event (through the task's `referrals_alias` outlet) when this
    run queued at least one image for review; a run that queued none emits nothing, so the review
    DAG is not triggered for nothing. True when an event was added."""
    from leukemia.tasks.assets import referrals_alias, referrals_asset

    if not result.get("queued"):
        return False
    extra = {
        "queued": int(result["queued"]),
        "referred": int(result.get("referred", 0)),
        "model_version": str(result.get("model_version", "")),
        "predictions_uri": str(result.get("predictions_uri", "")),
    }
    outlet_events[referrals_alias()].add(referrals_asset(), extra=extra)
    log.info("Announced %d newly queued referrals (leukemia_referrals)", extra["queued"])
    return True


def announce_drift(result: dict[str, Any], context: Any = None) -> bool:
    """Alert (`alerts.announce`, never raising) when the run's batch drifted; True when sent."""
    from leukemia import alerts

    drift = result.get("drift") or {}
    if not drift.get("drifted"):
        return False
    body = "\n".join(
        [
            drift.get("line", ""),
            f"Every image of the batch is referred to a person ({result.get('referred', 0)} "
            f"referred, {result.get('queued', 0)} newly queued for review).",
            f"Predictions: {result.get('predictions_uri', '')}",
            f"Drift report: {result.get('drift_uri', '')}",
            f"Model: {result.get('model_uri', '')}",
        ]
    )
    subject = f"Scoring batch drifted: {result.get('scored', 0)} images unlike the training images"
    return alerts.announce(alerts.Event.DRIFT, subject, body, context)
