"""The deployment's promotion policy: the gate's clinical thresholds and who approves a champion.

What a laboratory decides once is not a run setting. The thresholds a candidate must reach, whether
a person approves each new champion and who may, come from the deployment's environment (the DAG
author's and the operator's side: `.env`, the compose file, the demo), never from a DAG run's conf.
A run may **tighten** the policy (a higher minimum, a lower maximum, approval on, fewer
respondents) but never loosen it: a looser value is refused before anything runs, in one line that
names each value, the policy's value and the variable that sets it. Like a Kubernetes LimitRange,
the run asks within bounds the deployment set.

Settings (`config.ENV_DEFAULTS`, defaults from `config.RUN_DEFAULTS`):

    LEUKEMIA_MIN_F1_MACRO               test macro-F1 a candidate must reach
    LEUKEMIA_MIN_MALIGNANT_SENSITIVITY  share of malignant test images called malignant
    LEUKEMIA_MIN_BENIGN_SPECIFICITY     share of benign test images called benign
    LEUKEMIA_PROMOTION_MARGIN           test macro-F1 a candidate must gain over the champion
    LEUKEMIA_MAX_TEST_ECE               largest expected calibration error of its calibrated test
                                        probabilities (a maximum: a run may only lower it)
    LEUKEMIA_REQUIRE_APPROVAL           a person approves each candidate that passed the gate
    LEUKEMIA_APPROVAL_RESPONDENTS       Airflow users who may approve (comma-separated; empty: any
                                        user who may act on the DAG)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from leukemia.config import env, env_flag

#: Each threshold of the gate: the Param / policy field, and the variable that sets it.
THRESHOLD_VARIABLES: dict[str, str] = {
    "min_f1_macro": "LEUKEMIA_MIN_F1_MACRO",
    "min_malignant_sensitivity": "LEUKEMIA_MIN_MALIGNANT_SENSITIVITY",
    "min_benign_specificity": "LEUKEMIA_MIN_BENIGN_SPECIFICITY",
    "promotion_margin": "LEUKEMIA_PROMOTION_MARGIN",
    "max_test_ece": "LEUKEMIA_MAX_TEST_ECE",
}
#: The thresholds that are upper bounds: a run tightens them by asking for less, not more.
MAXIMA = frozenset({"max_test_ece"})
APPROVAL_VARIABLE = "LEUKEMIA_REQUIRE_APPROVAL"
RESPONDENTS_VARIABLE = "LEUKEMIA_APPROVAL_RESPONDENTS"
#: The run settings the policy bounds (a run's conf may only tighten these).
POLICY_PARAMS = (*THRESHOLD_VARIABLES, "require_approval", "approval_respondents")


class PolicyViolation(ValueError):
    """A run asked for a looser gate or approval than the deployment's policy; one line."""


@dataclass(frozen=True)
class Policy:
    """The promotion policy in force: thresholds, the approval requirement and its respondents."""

    min_f1_macro: float
    min_malignant_sensitivity: float
    min_benign_specificity: float
    promotion_margin: float
    max_test_ece: float
    require_approval: bool
    approval_respondents: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> Policy:
        """The deployment's policy (environment, else the documented defaults)."""
        thresholds = {name: _fraction(var) for name, var in THRESHOLD_VARIABLES.items()}
        respondents = tuple(u.strip() for u in env(RESPONDENTS_VARIABLE).split(",") if u.strip())
        return cls(
            **thresholds,
            require_approval=env_flag(APPROVAL_VARIABLE),
            approval_respondents=respondents,
        )

    def tightened(self, requested: Mapping[str, Any]) -> Policy:
        """The policy with a run's requested values applied, each only where it is stricter.

        Absent or None values keep the policy. Raises PolicyViolation, naming every looser value,
        when the run asks for a lower minimum (a higher maximum: `MAXIMA`), approval off while the
        policy requires it, or a respondent the policy does not allow.
        """
        changes: dict[str, Any] = {}
        looser: list[str] = []
        for name, variable in THRESHOLD_VARIABLES.items():
            value = requested.get(name)
            if value is None or value == "":
                continue
            value, bound = float(value), getattr(self, name)
            if name in MAXIMA and value > bound:
                looser.append(f"{name} {value:g} > {bound:g} ({variable})")
            elif name not in MAXIMA and value < bound:
                looser.append(f"{name} {value:g} < {bound:g} ({variable})")
            changes[name] = min(value, bound) if name in MAXIMA else max(value, bound)
        approval = requested.get("require_approval")
        if approval is not None:
            if self.require_approval and not approval:
                looser.append(f"require_approval false while {APPROVAL_VARIABLE} is true")
            changes["require_approval"] = self.require_approval or bool(approval)
        asked = tuple(str(u) for u in requested.get("approval_respondents") or ())
        if asked:
            outside = [
                u for u in asked if self.approval_respondents and u not in self.approval_respondents
            ]
            if outside:
                looser.append(
                    f"approval_respondents {', '.join(outside)} not in {RESPONDENTS_VARIABLE} "
                    f"({', '.join(self.approval_respondents)})"
                )
            changes["approval_respondents"] = asked
        if looser:
            raise PolicyViolation(
                "this run's conf loosens the deployment's promotion policy: "
                + "; ".join(looser)
                + ". A run may only tighten the policy: drop these values from the conf, or "
                "change the deployment's environment (docs/security.md, 'Policy is not a run "
                "setting')"
            )
        return replace(self, **changes)

    def thresholds(self) -> Any:
        """The gate's `gate.Thresholds` of this policy."""
        from leukemia.gate import Thresholds

        return Thresholds.of(self)


def _fraction(variable: str) -> float:
    """A threshold setting: a number from 0 to 1, else a one-line error naming the variable."""
    text = env(variable)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{variable} must be a number from 0 to 1, got {text!r}")
    return value
