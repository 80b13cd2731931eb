"""Promotion: what is decided without asking, what a reviewer's answer records, the report."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from leukemia.promotion import (
    KEEP,
    PROMOTE,
    REJECT,
    automatic_choice,
    decide_step,
    report_markdown,
    review_from_answer,
    review_markdown,
    summary_of,
)


def _gated(*failed: str) -> dict[str, Any]:
    names = (
        "min_f1_macro",
        "min_malignant_sensitivity",
        "min_benign_specificity",
        "min_gain_over_champion",
    )
    evaluation = {
        "version": "7",
        "metrics": {"f1_score": 0.95, "malignant_sensitivity": 1.0, "benign_specificity": 0.9},
        "intervals": {"f1_score": [0.9, 0.98]},
        "confusion_matrix": [[1, 0, 0, 0]] * 4,
        "examples": 4,
        "url": "http://mlflow/#/experiments/1/runs/e7",
    }
    return {
        "name": "leukemia-classifier",
        "version": "7",
        "run_id": "r7",
        "passed": not set(failed) - {"none"},
        "champion_note": "champion v6 re-evaluated on the same test split",
        "checks": [
            {
                "name": n,
                "status": "failed" if n in failed else "passed",
                "line": f"{n}: {'failed' if n in failed else 'passed'}: …",
            }
            for n in names
        ],
        "failures": [f"{n}: failed: …" for n in failed],
        "candidate": evaluation,
        "champion": {**evaluation, "version": "6", "url": "http://mlflow/#/experiments/1/runs/e6"},
        "card_url": "http://mlflow/#/experiments/1/runs/r7/artifacts/model_card.md",
    }


def test_a_clinical_failure_is_rejected_without_asking_anyone() -> None:
    review = automatic_choice(_gated("min_malignant_sensitivity", "min_gain_over_champion"), True)
    assert review is not None and review.choice == REJECT and review.how == "automatic"
    assert review.reason == "missed min_malignant_sensitivity: failed: …"


def test_a_candidate_that_does_not_beat_the_champion_keeps_it_without_asking() -> None:
    review = automatic_choice(_gated("min_gain_over_champion"), True)
    assert review is not None and review.choice == KEEP


def test_a_passing_candidate_waits_for_a_person_only_when_approval_is_required() -> None:
    assert automatic_choice(_gated(), require_approval=True) is None
    review = automatic_choice(_gated(), require_approval=False)
    assert review is not None and review.choice == PROMOTE and review.by == "the gate"


def test_a_reviewers_answer_records_name_comment_and_time() -> None:
    at = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
    event = {
        "chosen_options": [REJECT],
        "params_input": {"comment": "misses blasts on the new stain"},
        "responded_at": at,
        "responded_by_user": {"id": "dr-lee", "name": "Dr Lee"},
        "timedout": False,
    }
    review = review_from_answer(event, 72)
    assert (review.choice, review.by, review.how) == (REJECT, "Dr Lee", "person")
    assert (
        review.comment == "misses blasts on the new stain"
        and review.at == "2026-11-27T09:30:00+00:00"
    )


def test_no_answer_in_time_keeps_the_champion_and_says_so() -> None:
    event = {
        "chosen_options": [KEEP],
        "params_input": {"comment": ""},
        "responded_at": datetime.now(UTC),
        "responded_by_user": None,
        "timedout": True,
    }
    review = review_from_answer(event, 72)
    assert (review.choice, review.by, review.how) == (KEEP, "nobody", "timeout")
    assert review.reason == "no answer within 72 h: default applied"


def test_a_decision_task_refuses_to_act_against_the_review() -> None:
    review = {"choice": REJECT, "by": "dr-lee", "how": "person", "reason": "answered"}
    with pytest.raises(RuntimeError, match="promote runs only when the review chose it"):
        decide_step(_gated(), review, "promote", "leukemia_training/manual__1")
    with pytest.raises(RuntimeError, match="recorded no review"):
        decide_step(_gated(), None, "promote", "leukemia_training/manual__1")


def test_the_reviewer_sees_both_models_both_confusion_matrices_and_the_card() -> None:
    body = review_markdown(_gated(), 72)
    assert "| metric | v7 | champion v6 |" in body
    assert (
        "[v7 confusion matrix](http://mlflow/#/experiments/1/runs/e7/artifacts/confusion_matrix.png)"
        in body
    )
    assert (
        "[v6 confusion matrix](http://mlflow/#/experiments/1/runs/e6/artifacts/confusion_matrix.png)"
        in body
    )
    assert "[model card](http://mlflow/#/experiments/1/runs/r7/artifacts/model_card.md)" in body
    assert "With no answer within 72 h, keep the champion applies." in body


def test_the_report_has_one_line_per_threshold_and_says_what_happens_next() -> None:
    gated = _gated("min_f1_macro")
    lines = report_markdown(gated, require_approval=True).splitlines()
    assert lines[0].startswith("leukemia-classifier v7 (run r7): gate failed; champion v6")
    assert lines[1:5] == [f"- {c['line']}" for c in gated["checks"]]
    assert lines[5] == "Next: rejected by the gate: missed min_f1_macro: failed: …"
    waiting = report_markdown(_gated(), require_approval=True).splitlines()[5]
    assert (
        waiting
        == "Next: Promote, keep the champion or reject: a person decides in Required Actions"
    )
    assert report_markdown(None, True).startswith("No gate")
    assert summary_of(_gated(), require_approval=False)["alias"] == "champion"
    assert summary_of(None, require_approval=False) is None
