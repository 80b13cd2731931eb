"""The steps of the `leukemia_review` DAG: open a form of referred images, ask a person (Airflow's
Human-in-the-loop entry form), and apply the labels (`review.py` does the work).

The form's fields are known only when the run opens its form, while Airflow fixes an operator's
Params when the DAG is parsed: `ReviewFormOperator` builds them from the form's manifest when it
asks and again when the answer comes back, and checks each answer itself, so that an answer naming
an unknown class refuses that image (it stays pending) instead of failing the task.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLEntryOperator

from leukemia.config import env

log = logging.getLogger(__name__)

#: The alias the labelling task emits through: an event of the raw-images asset only when at least
#: one image landed (an outlet asset itself would emit on every successful run).
LABELS_ALIAS = "leukemia_review_labels"


def labels_alias() -> Any:
    from airflow.sdk import AssetAlias

    return AssetAlias(name=LABELS_ALIAS)


def _client(conn_id: str) -> Any:
    from leukemia.objectstore import s3_client

    return s3_client(conn_id or env("LEUKEMIA_AWS_CONN_ID"))


def open_form(bucket: str, conn_id: str, form: str) -> str:
    """Claim the oldest pending images for this run's form; the manifest's key ("" for none)."""
    from leukemia import review

    return review.open_form(_client(conn_id), bucket, form, review.ReviewSettings.from_env())


def apply_labels(bucket: str, conn_id: str, answer: dict[str, Any]) -> dict[str, Any]:
    """Apply the reviewer's answer and close the form (`review.apply_labels`)."""
    from leukemia import review

    return review.apply_labels(_client(conn_id), bucket, answer)


def form_params(manifest: dict[str, Any]) -> dict[str, Any]:
    """One Param per image: the four classes, unusable or skip (the default, also on timeout)."""
    from leukemia import review
    from leukemia.tasks.params import param

    return {
        entry["param"]: param(
            review.SKIP,
            type="string",
            enum=list(review.CHOICES),
            title=review.field_title(n, entry),
            description=f"{entry['key']}: model says {entry['prediction_set']}",
            description_md=review.describe(entry),
        )
        for n, entry in enumerate(manifest["images"], start=1)
    }


class ReviewFormOperator(HITLEntryOperator):
    """Asks a person to label the images of the form `form_task_id` opened (its XCom: the manifest's
    key). DAG Params read: `bucket`, `conn_id`. The timeout comes from LEUKEMIA_REVIEW_TIMEOUT_HOURS;
    with no answer in time the scheduler answers "skip" for every image (the form's defaults), so
    the labelling task releases them all for the next form.
    """

    def __init__(self, *, form_task_id: str = "open_form", **kwargs: Any) -> None:
        kwargs.pop("params", None)  # the form's fields are built from its manifest
        super().__init__(subject="Label the images the classifier referred", **kwargs)
        self.form_task_id = form_task_id

    def _load_form(self, context: Any) -> tuple[str, dict[str, Any]]:
        """The manifest's key and content; sets the form's fields, subject and body from it."""
        from airflow.sdk.definitions.param import ParamsDict

        from leukemia import review

        key = context["ti"].xcom_pull(task_ids=self.form_task_id)
        params = context["params"]
        manifest = review.read_form(_client(params["conn_id"]), params["bucket"], key)
        self.params = ParamsDict(form_params(manifest))
        n = len(manifest["images"])
        self.subject = f"Label {n} referred blood-smear image{'s' if n != 1 else ''}"
        self.body = review.form_body(manifest)
        return key, manifest

    def execute(self, context: Any) -> Any:
        from leukemia.review import ReviewSettings

        key, manifest = self._load_form(context)
        hours = ReviewSettings.from_env().timeout_hours
        self.response_timeout = timedelta(hours=hours)
        log.info(
            "Waiting up to %g h for a reviewer to label %d images in Required Actions (form %s)",
            hours,
            len(manifest["images"]),
            key,
        )
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from leukemia import review

        key, manifest = self._load_form(context)
        if "error" in event:
            return super().execute_complete(context, event)  # raises the error
        self.validate_chosen_options(event["chosen_options"])
        answers, refused = review.read_answers(manifest, event.get("params_input") or {})
        for sha, reason in refused.items():
            log.warning("Refused the answer for image %s: %s", sha[:12], reason)
        user = event.get("responded_by_user") or {}
        responded_at = event.get("responded_at")
        return {
            "form": key,
            "answers": answers,
            "refused": refused,
            "reviewer": "" if event.get("timedout") else str(user.get("name") or ""),
            "reviewer_id": "" if event.get("timedout") else str(user.get("id") or ""),
            "responded_at": responded_at.isoformat() if responded_at else "",
            "timedout": bool(event.get("timedout")),
        }
