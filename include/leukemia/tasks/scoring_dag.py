"""The steps of the `leukemia_scoring` DAG: pin the model version, then score what is new."""

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
    explain: bool = False,
) -> dict[str, Any]:
    """Score the new images under the prefix with the pinned model; a small summary out.

    Talks to MLflow as the read-only scoring user where one is configured.
    """
    from leukemia.scoring import score_incoming

    with scoring_mlflow_login():
        result = score_incoming(
            bucket=bucket,
            prefix=incoming_prefix,
            conn_id=conn_id,
            model_uri=model_uri,
            batch_size=batch_size,
            explain=explain,
        )
    out = asdict(result)
    out["skipped_keys"] = out["skipped_keys"][:LISTED_SKIPPED]
    return out
