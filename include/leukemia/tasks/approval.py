"""The reviewer's step of the training DAG: Airflow's Human-in-the-loop branch operator.

Between the gate and any alias move, `ReviewOperator` shows a person the comparison (both models'
test metrics with intervals, links to both confusion matrices and the model card) and offers
Promote / Keep the champion / Reject, each leading to its decision task. It asks only when the gate
passed and the run's `require_approval` Param is on; otherwise it takes the automatic decision
(`promotion.automatic_choice`) at once, without waiting. Respondents and the timeout come from the
run's Params; no answer in time keeps the champion (the operator's default, applied by the
scheduler). Answered in the UI's Required Actions page or over the REST API
(`PATCH /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/approval/-1/hitlDetails`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLBranchOperator

from leukemia.promotion import DECISION_TASKS, KEEP
from leukemia.tasks.params import param

log = logging.getLogger(__name__)

#: Where the reviewer's answer (a `promotion.Review` as a dict) is left for the decision tasks.
REVIEW_KEY = "review"


class ReviewOperator(HITLBranchOperator):
    """Asks a person to promote, keep the champion or reject the gated candidate.

    `gate_task_id` names the task whose XCom is the gate's result. Params read when the task runs
    (through `RunRequest`): `require_approval`, `approval_respondents` (Airflow user ids; empty:
    anyone who may act on the DAG) and `approval_timeout_hours`.
    """

    def __init__(self, *, gate_task_id: str = "register_and_gate", **kwargs: Any) -> None:
        kwargs.pop("params", None)  # the form's fields are ours; the run's Params reach the context
        super().__init__(
            subject="Promote the new leukaemia classifier?",
            options=list(DECISION_TASKS),
            defaults=[KEEP],
            options_mapping=dict(DECISION_TASKS),
            params={
                "comment": param(
                    "",
                    type="string",
                    title="Comment",
                    description="Why: recorded on the model version with your name.",
                )
            },
            **kwargs,
        )
        self.gate_task_id = gate_task_id

    def execute(self, context: Any) -> Any:
        from leukemia import promotion
        from leukemia.tasks.training_dag import RunRequest

        run = RunRequest.from_params(context["params"])
        gated = context["ti"].xcom_pull(task_ids=self.gate_task_id)
        automatic = promotion.automatic_choice(gated, run.require_approval)
        if automatic is not None:
            log.info("Not asking anyone: %s → %s", automatic.reason, automatic.choice)
            context["ti"].xcom_push(REVIEW_KEY, asdict(automatic))
            return self.do_branch(context, DECISION_TASKS[automatic.choice])
        timeout = run.approval_timeout_hours
        self.subject = f"Promote {gated['name']} v{gated['version']} to @champion?"
        self.body = promotion.review_markdown(gated, timeout)
        self.response_timeout = timedelta(hours=timeout)
        respondents = list(run.approval_respondents)
        self.assigned_users = [{"id": u, "name": u} for u in respondents] or None
        log.info(
            "Waiting for %s (up to %g h) to decide on v%s in Required Actions",
            ", ".join(respondents) or "anyone with access to this DAG",
            timeout,
            gated["version"],
        )
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from leukemia import promotion
        from leukemia.tasks.training_dag import RunRequest

        if "error" not in event:
            timeout = RunRequest.from_params(context["params"]).approval_timeout_hours
            review = promotion.review_from_answer(event, timeout)
            context["ti"].xcom_push(REVIEW_KEY, asdict(review))
        return super().execute_complete(context, event)
