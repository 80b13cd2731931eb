"""The deployment's promotion policy: from the environment, tightened but never loosened by a run,
and refused at trigger time by the training DAG's Param schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from leukemia.policy import Policy, PolicyViolation

ROOT = Path(__file__).resolve().parents[1]
LOOSE = {
    "LEUKEMIA_MIN_F1_MACRO": "0.5",
    "LEUKEMIA_MIN_MALIGNANT_SENSITIVITY": "0.5",
    "LEUKEMIA_MIN_BENIGN_SPECIFICITY": "0.5",
    "LEUKEMIA_PROMOTION_MARGIN": "0",
    "LEUKEMIA_MAX_TEST_ECE": "0.2",
}


@pytest.fixture()
def policy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in LOOSE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LEUKEMIA_REQUIRE_APPROVAL", "true")
    monkeypatch.setenv("LEUKEMIA_APPROVAL_RESPONDENTS", "dr-lee, dr-ng")
    return monkeypatch


def test_policy_reads_thresholds_approval_and_respondents_from_the_environment(
    policy_env: pytest.MonkeyPatch,
) -> None:
    policy = Policy.from_env()
    assert (policy.min_f1_macro, policy.min_malignant_sensitivity) == (0.5, 0.5)
    assert policy.require_approval is True
    assert policy.approval_respondents == ("dr-lee", "dr-ng")
    assert policy.thresholds().min_gain_over_champion == 0.0


def test_a_run_may_raise_thresholds_and_narrow_respondents(policy_env: pytest.MonkeyPatch) -> None:
    tight = Policy.from_env().tightened(
        {"min_f1_macro": 0.95, "promotion_margin": 0.01, "approval_respondents": ["dr-ng"]}
    )
    assert tight.min_f1_macro == 0.95 and tight.promotion_margin == 0.01
    assert tight.min_benign_specificity == 0.5  # untouched: the policy's
    assert tight.approval_respondents == ("dr-ng",) and tight.require_approval is True
    assert tight.max_test_ece == 0.2  # untouched
    # a maximum tightens downwards
    assert Policy.from_env().tightened({"max_test_ece": "0.05"}).max_test_ece == 0.05


def test_a_run_may_not_lower_a_threshold_switch_approval_off_or_add_a_respondent(
    policy_env: pytest.MonkeyPatch,
) -> None:
    policy = Policy.from_env()
    with pytest.raises(PolicyViolation, match=r"min_benign_specificity 0\.4 < 0\.5"):
        policy.tightened({"min_benign_specificity": 0.4})
    with pytest.raises(
        PolicyViolation, match=r"max_test_ece 0\.3 > 0\.2 \(LEUKEMIA_MAX_TEST_ECE\)"
    ):
        policy.tightened({"max_test_ece": 0.3})
    with pytest.raises(PolicyViolation, match="require_approval false while"):
        policy.tightened({"require_approval": False})
    with pytest.raises(PolicyViolation, match="approval_respondents mallory not in"):
        policy.tightened({"approval_respondents": ["dr-lee", "mallory"]})


def test_without_approval_in_the_policy_a_run_may_turn_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEUKEMIA_REQUIRE_APPROVAL", "false")
    monkeypatch.delenv("LEUKEMIA_APPROVAL_RESPONDENTS", raising=False)
    policy = Policy.from_env()
    assert policy.tightened({"require_approval": True}).require_approval is True
    assert policy.tightened({"require_approval": False}).require_approval is False
    assert policy.tightened({"approval_respondents": ["anyone"]}).approval_respondents == (
        "anyone",
    )


def test_a_malformed_policy_setting_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEUKEMIA_MIN_F1_MACRO", "ninety")
    with pytest.raises(ValueError, match="LEUKEMIA_MIN_F1_MACRO must be a number from 0 to 1"):
        Policy.from_env()
    monkeypatch.setenv("LEUKEMIA_MIN_F1_MACRO", "1.5")
    with pytest.raises(ValueError, match="got '1.5'"):
        Policy.from_env()


def test_training_dag_refuses_a_looser_conf_when_the_run_is_triggered(
    policy_env: pytest.MonkeyPatch,
) -> None:
    """The Params' schema carries the policy: the UI and the REST API refuse before a run exists."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    dag = DagBag(dag_folder=str(ROOT / "dags" / "leukemia_training.py")).dags["leukemia_training"]
    dag.params.validate()  # the defaults (empty: the policy itself) are valid
    assert dag.params.get_param("min_f1_macro").resolve(0.95) == 0.95
    assert dag.params.get_param("require_approval").resolve(True) is True
    assert dag.params.get_param("max_test_ece").resolve(0.1) == 0.1  # lower: stricter
    for name, looser in (("min_f1_macro", 0.0), ("require_approval", False), ("max_test_ece", 0.3)):
        with pytest.raises(ParamValidationError):
            dag.params.get_param(name).resolve(looser)
