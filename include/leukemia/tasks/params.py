"""DAG Params shared by the DAGs: typed, titled and described, with environment defaults; and the
task defaults the training, scoring and review DAGs share."""

from __future__ import annotations

import typing
from typing import Any

from leukemia.config import env

#: The JSON-schema dialect every Param declares. Airflow validates each Param of a run many times a
#: task (serializing the DAG, building each task's context: about 4,500 times in a tiny training run)
#: with jsonschema, which without a `$schema` uses draft 2020-12 and first checks the schema against
#: that dialect's large metaschema; with draft-07's a validation is 2 to 3.3 times faster
#: (`bench/params.py`, RESULTS.md). The Params use nothing newer than draft-07.
DIALECT = "http://json-schema.org/draft-07/schema#"


def param(default: Any, **schema: Any) -> Any:
    """An Airflow `Param` with `default` and the JSON-schema keywords `schema` (type, title,
    description, bounds, enum...), in the `DIALECT` every Param of the project declares."""
    from airflow.sdk import Param

    return Param(default, **{"$schema": DIALECT, **schema})


def task_defaults() -> dict[str, Any]:
    """`default_args` of the training, scoring and review DAGs: one retry after 30 s, then the
    failure alert (`alerts.failure_notifiers`; none when alerts are off)."""
    from datetime import timedelta

    from leukemia import alerts

    return {
        "retries": 1,
        "retry_delay": timedelta(seconds=30),
        "on_failure_callback": alerts.failure_notifiers(),
    }


def s3_params(
    bucket_description: str, prefix: str | None = None, prefix_key: str = "prefix"
) -> dict[str, Any]:
    """`bucket`, a prefix and `conn_id` Params (the prefix defaults to the raw-image prefix)."""
    return {
        "bucket": param(
            env("LEUKEMIA_BUCKET"), type="string", title="S3 bucket", description=bucket_description
        ),
        prefix_key: param(
            prefix if prefix is not None else env("LEUKEMIA_RAW_PREFIX"),
            type="string",
            title="S3 prefix",
            description="Prefix of the images, e.g. raw/ (class folders below it) or incoming/.",
        ),
        "conn_id": param(
            env("LEUKEMIA_AWS_CONN_ID"),
            type="string",
            title="AWS connection",
            description="Airflow connection used by the S3 hook.",
        ),
    }


def training_params() -> dict[str, Any]:
    """The training DAG's Params, built from their one declaration (`config.RunDefaults`): the JSON
    type from the field's type, the default from `RUN_DEFAULTS` (or the environment setting the
    declaration names), title, description and bounds from its metadata. The promotion policy's
    bounds are `policy_params`."""
    from leukemia.config import RUN_DEFAULTS, RunDefaults, env

    hints, policy = typing.get_type_hints(RunDefaults), policy_params()
    out: dict[str, Any] = {}
    for name, spec in RunDefaults.params().items():
        if spec.pop("policy", False):
            out[name] = policy[name]
            continue
        default = env(spec.pop("env")) if "env" in spec else getattr(RUN_DEFAULTS, name)
        schema = json_schema(hints[name])
        if "items" in spec:
            schema["items"] = {**schema["items"], **spec.pop("items")}
        if isinstance(default, tuple):
            default = list(default)
        out[name] = param(default, **schema, **spec)
    return out


def json_schema(hint: Any) -> dict[str, Any]:
    """The JSON-schema type of a setting's Python type (int, float, bool, str, tuple[X, ...], X | None)."""
    from leukemia.config import setting_type

    names = {int: "integer", float: "number", bool: "boolean", str: "string"}
    scalar, optional, sequence = setting_type(hint)
    if sequence:
        return {"type": "array", "items": {"type": names[scalar]}}
    return {"type": ["null", names[scalar]] if optional else names[scalar]}


def policy_params() -> dict[str, Any]:
    """The gate's thresholds and the approval Params: empty means the deployment's policy
    (`policy.Policy.from_env`); the schema refuses a looser value when the run is triggered, and
    `RunRequest.from_params` refuses it again when a task reads it (the policy on the worker)."""
    from leukemia.config import RunDefaults
    from leukemia.policy import (
        APPROVAL_VARIABLE,
        MAXIMA,
        RESPONDENTS_VARIABLE,
        THRESHOLD_VARIABLES,
        Policy,
    )

    policy, declared = Policy.from_env(), RunDefaults.params()
    params: dict[str, Any] = {
        name: param(
            None,
            type=["null", "number"],
            # a minimum may only rise to 1; a maximum (`policy.MAXIMA`) may only fall to 0
            minimum=0 if name in MAXIMA else getattr(policy, name),
            maximum=getattr(policy, name) if name in MAXIMA else 1,
            title=declared[name]["title"],
            description=f"Gate: {declared[name]['description']}. Empty: the deployment's policy, "
            f"{variable}={getattr(policy, name):g}; a run may only "
            f"{'lower' if name in MAXIMA else 'raise'} it.",
        )
        for name, variable in THRESHOLD_VARIABLES.items()
    }
    approval = "on" if policy.require_approval else "off"
    params["require_approval"] = param(
        None,
        type=["null", "boolean"],
        enum=[None, True] if policy.require_approval else [None, True, False],
        title=declared["require_approval"]["title"],
        description="A person promotes each candidate that passed the gate, in Required Actions. "
        f"Empty: the deployment's policy, {APPROVAL_VARIABLE} ({approval}); a run may turn it "
        "on, never off.",
    )
    allowed = list(policy.approval_respondents)
    params["approval_respondents"] = param(
        [],
        type="array",
        items={"type": "string", **({"enum": allowed} if allowed else {})},
        title=declared["approval_respondents"]["title"],
        description="Airflow users who may answer. Empty: the deployment's policy, "
        f"{RESPONDENTS_VARIABLE} ({', '.join(allowed) or 'anyone who may act on this DAG'}); "
        "a run may only narrow it.",
    )
    return params
