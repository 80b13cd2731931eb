"""Promotion a laboratory can trust: select, register and gate the candidate, ask a person, decide;
roll back.

The training DAG's `select_candidate`, `register_and_gate`, `approval` and decision tasks call these
(through `tasks.training_dag` and `tasks.approval`), the command line calls `rollback`, and the
benchmarks and tests call `select_and_promote` (the same steps without a person). Every move of
`@champion` goes through `registry.move_champion`, which refuses a version the gate did not pass: a
candidate that misses a threshold never becomes champion, whoever asks.

The reviewer's three options and what each does:

- **Promote**: `@champion` moves to the candidate (the champion asset then triggers re-scoring).
- **Keep the champion**: the champion stays; the candidate gets `@challenger`. Also the answer when
  nobody answers in time, and what a candidate that passes every clinical threshold but does not
  beat the champion gets without asking.
- **Reject**: the candidate is marked `rejected` and can never be champion (not even by rollback).
  Also what a candidate that misses a clinical threshold gets without asking.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROMOTE, KEEP, REJECT = "Promote", "Keep the champion", "Reject"
#: The reviewer's options, in the order shown, and the training DAG task each one leads to.
DECISION_TASKS: dict[str, str] = {PROMOTE: "promote", KEEP: "keep_champion", REJECT: "reject"}
#: What each decision is recorded as on the version (tag `decision`).
DECISION_WORDS: dict[str, str] = {
    PROMOTE: "promoted",
    KEEP: "kept as challenger",
    REJECT: "rejected",
}


@dataclass
class Review:
    """Who decided and how (small: fits in XCom).

    `how` is `person` (an answer in Airflow), `timeout` (nobody answered: the default applied) or
    `automatic` (no question was asked, `reason` says why).
    """

    choice: str
    by: str
    how: str
    reason: str
    comment: str = ""
    at: str = ""

    def __post_init__(self) -> None:
        if self.choice not in DECISION_TASKS:
            raise ValueError(f"unknown choice {self.choice!r}: one of {', '.join(DECISION_TASKS)}")
        self.at = self.at or datetime.now(UTC).isoformat(timespec="seconds")


def automatic_choice(gated: Mapping[str, Any], require_approval: bool) -> Review | None:
    """The decision taken without asking, or None when a person decides (the gate passed and
    approval is required)."""
    from leukemia.gate import FAILED, GAIN_CHECK

    failed = [c for c in gated["checks"] if c["status"] == FAILED]
    clinical = [c["line"] for c in failed if c["name"] != GAIN_CHECK]
    if clinical:
        return Review(REJECT, "the gate", "automatic", "missed " + "; ".join(clinical))
    if failed:
        return Review(
            KEEP, "the gate", "automatic", f"does not beat the champion: {failed[0]['line']}"
        )
    if not require_approval:
        return Review(
            PROMOTE, "the gate", "automatic", "passed every threshold; approval not required"
        )
    return None


def review_from_answer(event: Mapping[str, Any], timeout_hours: float) -> Review:
    """A `Review` from the HITL operator's resume event (a person's answer, or the timeout's)."""
    choice = event["chosen_options"][0]
    comment = str((event.get("params_input") or {}).get("comment") or "")
    at = event.get("responded_at")
    at = at.isoformat(timespec="seconds") if hasattr(at, "isoformat") else str(at or "")
    user = event.get("responded_by_user") or {}
    if event.get("timedout") or not user:
        return Review(
            choice,
            "nobody",
            "timeout",
            f"no answer within {timeout_hours:g} h: default applied",
            at=at,
        )
    name = user.get("name") or user.get("id") or "?"
    return Review(choice, str(name), "person", f"answered by {name} in Airflow", comment, at)


# --- the steps of the training DAG ----------------------------------------------------------------


def provenance(split: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Where the images came from and what the split holds (for the model card)."""
    conflicts = split.get("conflicts", 0)
    return {
        "source": source,
        "digest": split.get("digest", ""),
        "images": split.get("images", 0),
        "counts": split.get("counts", {}),
        "duplicate_groups": split.get("duplicate_groups", 0),
        "conflicts": len(conflicts) if isinstance(conflicts, list) else conflicts,
    }


def select_candidate(experiment_id: str, airflow_run_id: str | None = None) -> dict[str, Any]:
    """The best finished training run of one DAG run by validation macro-F1 (ties: lower
    validation log-loss), as a small dict: `run_id`, `selection` (why, in words), its validation
    metrics and how many configurations were compared. Registers nothing."""
    from leukemia.selection import (
        CV_SELECTION_METRIC,
        SELECTION_METRIC,
        best_run,
        cross_validated,
        finished_and_pruned,
    )

    runs, pruned_runs = finished_and_pruned(experiment_id, airflow_run_id)
    run = best_run(runs)
    val = {k: v for k, v in run.data.metrics.items() if k.startswith("val_")}
    # best_run ranks by the CV mean when every run was cross-validated: say which one decided
    metric = CV_SELECTION_METRIC if cross_validated(runs) else SELECTION_METRIC
    pruned = len(pruned_runs)
    compared = f"{len(runs)} configuration(s)"
    if pruned:  # successive halving: only the finalists were compared
        compared = f"{len(runs)} finalist(s) of {len(runs) + pruned} configurations (halving)"
    selection = (
        f"best {metric} {run.data.metrics.get(metric, float('nan')):.4f} of "
        f"{compared} trained by {airflow_run_id or 'this experiment'}"
    )
    log.info("Selected run %s: %s", run.info.run_id, selection)
    return {
        "run_id": run.info.run_id,
        "selection": selection,
        "configurations": len(runs),
        "val": val,
    }


def register_and_gate(
    selected: Mapping[str, Any],
    split: Mapping[str, Any],
    thresholds: Any,
    airflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Register the selected run's full model (no alias) and gate it; write its card.

    `selected` is any dict with the training run's `run_id` (and optionally `selection`): what
    the DAG's selection step returned. `split` is the split's info (`path`, `images_uri`, digest,
    counts, …): both models are evaluated on its test images, read from `images_uri`. Never moves
    an alias; any error is raised (nothing is decided, the alias stays).
    """
    from leukemia import gate, model_card, registry

    images = split.get("images_uri") or split.get("images_dir") or ""
    candidate = registry.register_candidate(
        str(selected["run_id"]),
        split["path"],
        images,
        airflow_run_id,
        str(selected.get("selection") or ""),
    )
    registry.tag_version(
        candidate.name, candidate.version, drift_reference(candidate.run_id, images)
    )
    result = gate.run_gate(
        candidate,
        split["path"],
        images,
        thresholds,
        provenance(split, str(images)),
        airflow_run_id,
    )
    card_url = model_card.write_card(candidate.name, candidate.version)
    return {**gate.to_dict(result), "card_url": card_url}


def drift_reference(run_id: str, images_dir: str) -> dict[str, str]:
    """The drift watch's reference of the registered run (`watch.store_reference`) as version
    tags; {} with one warning when it cannot be fitted: the watch is monitoring, not the gate, and
    the version is then scored without a drift decision."""
    from leukemia.errors import first_line
    from leukemia.watch import store_reference

    try:
        return store_reference(run_id, images_dir)
    except Exception as exc:
        log.warning(
            "No drift reference for run %s (%s): its scoring gives no drift decision",
            run_id,
            first_line(exc),
        )
        return {}


def decide(gated: Mapping[str, Any], review: Review, source: str) -> dict[str, Any]:
    """Apply a decision to the gated candidate: move `@champion`, set `@challenger`, or reject.

    Then records on the version who decided, when, how and their comment (tags `decision`,
    `decided_by`, `decided_at`, `decision_how`, `decision_reason`, `review_comment`) and
    re-writes the model card. Returns the outcome (the decision task's XCom).
    """
    from leukemia import model_card, registry

    name, version = gated["name"], str(gated["version"])
    before = registry.current_champion(name)
    alias = ""
    if review.choice == PROMOTE:  # first: a refused move must not leave "promoted" on the version
        why = f"gate passed ({headline(gated)}); {review.reason}"
        if review.comment:
            why += f": {review.comment}"
        registry.move_champion(version, "promotion", why, review.by, source, name)
        alias = registry.CHAMPION
    elif review.choice == KEEP:  # only ever chosen for a candidate that met the clinical thresholds
        registry.set_challenger(version, name)
        alias = registry.CHALLENGER
    registry.tag_version(
        name,
        version,
        {
            "decision": DECISION_WORDS[review.choice],
            "decided_by": review.by,
            "decided_at": review.at,
            "decision_how": review.how,
            "decision_reason": review.reason,
            "review_comment": review.comment,
        },
    )
    card_url = model_card.write_card(name, version)
    if alias == registry.CHAMPION and before is not None and str(before.version) != version:
        model_card.write_card(name, str(before.version))  # its status changed too
    outcome = {
        "run_id": gated["run_id"],
        "version": version,
        "alias": alias,
        "decision": DECISION_WORDS[review.choice],
        "reason": f"{DECISION_WORDS[review.choice]} by {review.by}: {review.reason}",
        "review": asdict(review),
        "gate": "passed" if gated.get("passed") else "failed",
        "checks": [c["line"] for c in gated["checks"]],
        "failures": list(gated.get("failures", [])),
        "card_url": card_url,
    }
    log.info("%s v%s %s", name, version, outcome["reason"])
    return outcome


def decide_step(
    gated: Mapping[str, Any], review: Mapping[str, Any] | None, task_id: str, source: str
) -> dict[str, Any]:
    """The training DAG's decision tasks: apply the review, which must lead to `task_id` (a
    decision task run by hand, against the review, refuses)."""
    if not review:
        raise RuntimeError(
            "the approval task recorded no review: clear the approval task so that it decides again"
        )
    answer = Review(**review)
    if DECISION_TASKS[answer.choice] != task_id:
        raise RuntimeError(
            f"{task_id} runs only when the review chose it, but it chose {answer.choice!r} "
            f"(by {answer.by}): clear the approval task to decide again"
        )
    return decide(gated, answer, source)


def headline(gated: Mapping[str, Any]) -> str:
    """`macro-F1 0.951, malignant sensitivity 1.000, benign specificity 0.962` of the candidate."""
    metrics = gated["candidate"]["metrics"]
    return ", ".join(
        f"{words} {metrics.get(metric, float('nan')):.3f}"
        for metric, words in (
            ("f1_score", "macro-F1"),
            ("malignant_sensitivity", "malignant sensitivity"),
            ("benign_specificity", "benign specificity"),
        )
    )


def review_markdown(gated: Mapping[str, Any], timeout_hours: float) -> str:
    """What the reviewer reads: both models on the same test split with intervals, the gate's
    checks, links to both confusion matrices and the model card, and what each option does."""
    from leukemia.model_card import metrics_table

    new, old = gated["candidate"], gated.get("champion")
    champion = f"champion v{old['version']}" if old else "no champion"
    links = [f"[v{gated['version']} confusion matrix]({new['url']}/artifacts/confusion_matrix.png)"]
    if old:
        links.append(
            f"[v{old['version']} confusion matrix]({old['url']}/artifacts/confusion_matrix.png)"
        )
    links.append(f"[model card]({gated.get('card_url', '')})")
    return "\n".join(
        [
            f"**{gated['name']} v{gated['version']}** passed every threshold of the promotion gate "
            f"({gated.get('champion_note', '')}).",
            "",
            *metrics_table(dict(gated)),
            "",
            "Gate:",
            *(f"- {c['line']}" for c in gated["checks"]),
            "",
            " · ".join(links),
            "",
            f"**{PROMOTE}**: v{gated['version']} becomes @champion and incoming images are scored "
            f"again with it. **{KEEP}**: {champion} stays, v{gated['version']} becomes "
            f"@challenger. **{REJECT}**: v{gated['version']} can never be champion. With no answer "
            f"within {timeout_hours:g} h, {KEEP.lower()} applies.",
        ]
    )


def next_step(gated: Mapping[str, Any], require_approval: bool) -> str:
    """What happens to the gated candidate: the automatic decision, or who is asked."""
    review = automatic_choice(gated, require_approval)
    if review is None:
        return (
            f"{PROMOTE}, {KEEP.lower()} or {REJECT.lower()}: a person decides in Required Actions"
        )
    return f"{DECISION_WORDS[review.choice]} by {review.by}: {review.reason}"


def summary_of(gated: Mapping[str, Any] | None, require_approval: bool) -> dict[str, Any] | None:
    """The gate's outcome as the grid summary's headline reads it (`run_id`, `version`,
    `alias`, `reason`); None when the gate failed to run."""
    if not gated:
        return None
    review = automatic_choice(gated, require_approval)
    alias = (
        {PROMOTE: "champion", KEEP: "challenger", REJECT: "none"}[review.choice] if review else "?"
    )
    return {
        "run_id": gated["run_id"],
        "version": gated["version"],
        "alias": alias,
        "reason": next_step(gated, require_approval),
    }


def report_markdown(gated: Mapping[str, Any] | None, require_approval: bool) -> str:
    """The gate for the run's report: one line per threshold, then what happens next."""
    if not gated:
        return "No gate: registering or gating the candidate failed (see the gate task's log).\n"
    verdict = "passed" if gated.get("passed") else "failed"
    lines = [
        f"{gated['name']} v{gated['version']} (run {gated['run_id']}): gate {verdict}; "
        f"{gated.get('champion_note', '')}",
        *(f"- {c['line']}" for c in gated["checks"]),
        f"Next: {next_step(gated, require_approval)}",
        f"Model card: {gated.get('card_url', '')}",
    ]
    return "\n".join(lines) + "\n"


def annotate_summary(
    summary_run_id: str, gated: Mapping[str, Any] | None, require_approval: bool
) -> None:
    """Add the gate's report (`gate.md`) to the run's grid-summary MLflow run."""
    from leukemia import registry

    registry.client().log_text(summary_run_id, report_markdown(gated, require_approval), "gate.md")


# --- without Airflow ------------------------------------------------------------------------------


def select_and_promote(
    experiment_id: str,
    split_path: str | Path,
    images_dir: str | Path,
    airflow_run_id: str | None = None,
    thresholds: Any = None,
    source: str = "",
) -> dict[str, Any]:
    """Select, register, gate and decide without a person: the steps of the training DAG for
    benchmarks and tests. The gate's thresholds default to the deployment's policy; where the
    policy requires approval, a candidate that passed keeps the champion (nobody was asked).
    Returns the decision."""
    from leukemia.dataset import read_split, split_counts
    from leukemia.policy import Policy

    policy = Policy.from_env()

    selected = select_candidate(experiment_id, airflow_run_id)
    rows = read_split(split_path)
    split = {
        "path": str(split_path),
        "images_uri": str(images_dir),
        "images": len(rows),
        "counts": split_counts(rows),
        "digest": "",
    }
    gated = register_and_gate(selected, split, thresholds or policy.thresholds(), airflow_run_id)
    review = automatic_choice(gated, policy.require_approval) or Review(
        KEEP, "the gate", "automatic", "approval required by the policy, and nobody was asked"
    )  # keeping the champion is the safe side
    return decide(gated, review, source or airflow_run_id or "select_and_promote")


# --- rollback -------------------------------------------------------------------------------------


def rollback(
    to_version: str, reason: str, by: str, source: str, name: str | None = None
) -> dict[str, Any]:
    """Move `@champion` back to `to_version` (verified), record the move, refresh both cards."""
    from leukemia import model_card, registry

    name = registry.model_name(name)
    move = registry.rollback(str(to_version), reason, by, source, name)
    for version in filter(None, {move.from_version, move.to_version}):
        model_card.write_card(name, version)
    return asdict(move)
