"""DAG Params shared by the DAGs: typed, titled and described, with environment defaults."""

from __future__ import annotations

from typing import Any

from leukemia.config import env


def s3_params(
    bucket_description: str, prefix: str | None = None, prefix_key: str = "prefix"
) -> dict[str, Any]:
    """`bucket`, a prefix and `conn_id` Params (the prefix defaults to the raw-image prefix)."""
    from airflow.sdk import Param

    return {
        "bucket": Param(
            env("LEUKEMIA_BUCKET"), type="string", title="S3 bucket", description=bucket_description
        ),
        prefix_key: Param(
            prefix if prefix is not None else env("LEUKEMIA_RAW_PREFIX"),
            type="string",
            title="S3 prefix",
            description="Prefix of the images, e.g. raw/ (class folders below it) or incoming/.",
        ),
        "conn_id": Param(
            env("LEUKEMIA_AWS_CONN_ID"),
            type="string",
            title="AWS connection",
            description="Airflow connection used by the S3 hook.",
        ),
    }


def policy_params() -> dict[str, Any]:
    """The gate's thresholds and the approval Params: empty means the deployment's policy
    (`policy.Policy.from_env`); the schema refuses a looser value when the run is triggered, and
    `RunRequest.from_params` refuses it again when a task reads it (the policy on the worker)."""
    from airflow.sdk import Param

    from leukemia.policy import APPROVAL_VARIABLE, RESPONDENTS_VARIABLE, THRESHOLD_VARIABLES, Policy

    policy = Policy.from_env()
    words = {
        "min_f1_macro": ("Minimum macro-F1", "test macro-F1 a candidate must reach"),
        "min_malignant_sensitivity": (
            "Minimum malignant sensitivity",
            "share of Early, Pre and Pro test images the candidate calls malignant",
        ),
        "min_benign_specificity": (
            "Minimum benign specificity",
            "share of Benign test images the candidate calls benign",
        ),
        "promotion_margin": (
            "Promotion margin",
            "test macro-F1 the candidate must gain over the champion (0: not worse)",
        ),
    }
    params: dict[str, Any] = {
        name: Param(
            None,
            type=["null", "number"],
            minimum=getattr(policy, name),
            maximum=1,
            title=title,
            description=f"Gate: {what}. Empty: the deployment's policy, {variable}="
            f"{getattr(policy, name):g}; a run may only raise it.",
        )
        for name, variable in THRESHOLD_VARIABLES.items()
        for title, what in [words[name]]
    }
    approval = "on" if policy.require_approval else "off"
    params["require_approval"] = Param(
        None,
        type=["null", "boolean"],
        enum=[None, True] if policy.require_approval else [None, True, False],
        title="Require approval",
        description="A person promotes each candidate that passed the gate, in Required Actions. "
        f"Empty: the deployment's policy, {APPROVAL_VARIABLE} ({approval}); a run may turn it "
        "on, never off.",
    )
    allowed = list(policy.approval_respondents)
    params["approval_respondents"] = Param(
        [],
        type="array",
        items={"type": "string", **({"enum": allowed} if allowed else {})},
        title="Respondents",
        description="Airflow users who may answer. Empty: the deployment's policy, "
        f"{RESPONDENTS_VARIABLE} ({', '.join(allowed) or 'anyone who may act on this DAG'}); "
        "a run may only narrow it.",
    )
    return params
