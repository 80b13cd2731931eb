"""The model card of each registered version: a Markdown artifact and the version's description.

Made only from what was logged: the version's tags (selection, gate, decision), its training run
(parameters and configuration) and the gate's `gate.json` (data provenance, test metrics with
95 % bootstrap intervals, the confusion matrix, the champion it was compared with). Written when
the gate has run and again when the decision is taken, so the card always says where the version
stands. `render` is pure; `write_card` gathers the facts and writes both places.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from leukemia.config import CLASSES

log = logging.getLogger(__name__)

#: Where the card lies in the version's training run, and MLflow's limit on a description.
CARD_FILE = "model_card.md"
DESCRIPTION_LIMIT = 5000

INTENDED_USE = (
    "Decision support for research: ranks peripheral blood smear images of suspected B-lineage "
    "acute lymphoblastic leukaemia into Benign, Early (early pre-B), Pre (pre-B) and Pro (pro-B) "
    "so that a haematologist looks at likely malignant smears first. **Not a diagnosis**: every "
    "call is reviewed by a qualified person, and the model is not used for other lineages, stains "
    "or magnifications than those of its training images."
)


@dataclass
class CardFacts:
    """Everything a card shows, as logged (see `gather`)."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    gate: dict[str, Any] | None
    card_url: str = ""
    aliases: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the training run's


def _interval(evaluation: dict[str, Any] | None, metric: str) -> str:
    if not evaluation or metric not in evaluation.get("metrics", {}):
        return "–"
    label = metric.removeprefix("recall_")
    if label in CLASSES and not sum(evaluation["confusion_matrix"][CLASSES.index(label)]):
        return "– (no test images)"
    low, high = evaluation["intervals"].get(metric, [float("nan")] * 2)
    return f"{evaluation['metrics'][metric]:.3f} ({low:.3f}–{high:.3f})"


def _status(facts: CardFacts) -> str:
    tags = facts.tags
    if "champion" in facts.aliases:
        return f"**@champion** (decided by {tags.get('decided_by', 'the promotion')})"
    if tags.get("decision") == "promoted":
        return (
            f"**promoted** by {tags.get('decided_by', '?')} ({tags.get('decided_at', '')}), no "
            "longer @champion (`python -m leukemia champion history` says since when)"
        )
    if tags.get("decision"):
        return f"**{tags['decision']}** by {tags.get('decided_by', '?')} ({tags.get('decided_at', '')})"
    if tags.get("gate") == "failed":
        return "**gate failed**: never champion"
    if tags.get("gate") == "passed":
        return "**gate passed**: awaiting the decision"
    return "**not gated**"


def _data(gate: dict[str, Any] | None, tags: dict[str, str]) -> list[str]:
    data = (gate or {}).get("provenance") or {}
    counts: dict[str, dict[str, int]] = data.get("counts") or {}
    per_class = {c: sum(split.get(c, 0) for split in counts.values()) for c in CLASSES}
    per_split = " · ".join(f"{s} {sum(v.values())}" for s, v in counts.items())
    return [
        "| | |",
        "|---|---|",
        f"| source | {data.get('source', 'not recorded')} |",
        f"| dataset digest | `{data.get('digest') or tags.get('dataset_digest', '')}` |",
        f"| images | {data.get('images', '?')} ({per_split or 'split not recorded'}) |",
        f"| images per class | {' · '.join(f'{c} {n}' for c, n in per_class.items())} |",
        f"| duplicate groups | {data.get('duplicate_groups', '?')} (identical images, kept in one split) |",
        f"| label conflicts | {data.get('conflicts', '?')} (the same image under two classes: left out) |",
    ]


def base_line(params: dict[str, str], metrics: dict[str, float]) -> str:
    """Which VGG16 base the model has: "" for the frozen base (the card's first line says so), else
    which blocks were fine-tuned, from what, and what it cost."""
    unfrozen = params.get("fine_tune_unfrozen")
    if not unfrozen:
        return ""
    source = params.get("fine_tune_source_used", "?")
    how = (
        "on the block-4 activations cached by the extraction"
        if source == "activations"
        else "from pixels"
    )
    seconds = metrics.get("fine_tune_seconds")
    cost = f" in {seconds:.0f} s" if seconds is not None else ""
    return (
        f"VGG16 base: **{unfrozen.replace(',', ', ')} fine-tuned** with the head {how}, "
        f"{params.get('epochs_run', '?')} epochs{cost} (learning rate "
        f"{params.get('fine_tune_learning_rate', '?')}), the earlier blocks frozen; run "
        f"`{params.get('source_run_id', '?')}` was the starting point.\n"
    )


def _model(facts: CardFacts) -> list[str]:
    params, tags = facts.params, facts.tags
    tuned = base_line(params, facts.metrics)
    keys = (
        "weights",
        "variant",
        "input_size",
        "optimizer",
        "learning_rate",
        "batch_size",
        "epochs",
        "epochs_run",
        "head_units",
        "dropout",
        "mask_overlay",
        "augment_copies",
        "augment_version",
        "seed",
    )
    rows = [f"| {k} | {params[k]} |" for k in keys if k in params]
    return [
        "VGG16 transfer learning: raw RGB pixels → VGG16 preprocessing → "
        f"{'VGG16 base' if tuned else 'frozen VGG16 base'} → pooling → dense head → 4-way softmax.",
        "",
        *([tuned] if tuned else []),
        "| setting | value |",
        "|---|---|",
        *rows,
        "",
        f"Configuration: `{tags.get('config', '')}`; model file sha256 `{tags.get('model_sha256', '')}`.",
    ]


def metrics_table(gate: dict[str, Any]) -> list[str]:
    """Candidate (and champion) test metrics with their intervals, as Markdown lines."""
    from leukemia.gate import REPORTED

    new, old = gate["candidate"], gate.get("champion")
    head = f"| metric | v{gate['version']} |" + (f" champion v{old['version']} |" if old else "")
    rows = [
        f"| {words} | {_interval(new, metric)} |" + (f" {_interval(old, metric)} |" if old else "")
        for metric, words in REPORTED.items()
    ]
    return [
        f"Test split, n = {new['examples']} images; point estimate (95 % bootstrap interval).",
        "",
        head,
        "|---|---|" + ("---|" if old else ""),
        *rows,
    ]


def _confusion(gate: dict[str, Any]) -> list[str]:
    new, old = gate["candidate"], gate.get("champion")
    lines = [
        "Rows: true class; columns: predicted class (test split).",
        "",
        "| true \\ predicted | " + " | ".join(CLASSES) + " |",
        "|---|" + "---|" * len(CLASSES),
    ]
    lines += [
        f"| {c} | " + " | ".join(str(n) for n in row) + " |"
        for c, row in zip(CLASSES, new["confusion_matrix"], strict=True)
    ]
    links = [f"[v{gate['version']}]({new['url']}/artifacts/confusion_matrix.png)"]
    if old:
        links.append(f"[champion v{old['version']}]({old['url']}/artifacts/confusion_matrix.png)")
    return [*lines, "", "Figures: " + " · ".join(links)]


def _decisions(facts: CardFacts) -> list[str]:
    tags, gate = facts.tags, facts.gate or {}
    lines = [f"- **Selection**: {tags.get('selection', 'not recorded')}"]
    if gate:
        verdict = "passed" if gate.get("passed") else "failed"
        lines.append(f"- **Gate**: {verdict}; {gate.get('champion_note', '')}")
        lines += [f"  - {c['line']}" for c in gate.get("checks", [])]
    if tags.get("decision"):
        comment = tags.get("review_comment") or "no comment"
        lines.append(
            f"- **Decision**: {tags['decision']} by {tags.get('decided_by', '?')} at "
            f"{tags.get('decided_at', '?')}: {tags.get('decision_reason', '')} ({comment})"
        )
    else:
        lines.append("- **Decision**: not taken yet")
    return lines


#: The audit's numbers on a version (tags copied from its run by `registry.register_candidate`).
AUDIT_LINES = (
    ("audit_overlay_region_accuracy", "classifier on the overlay corner only"),
    ("audit_background_region_accuracy", "classifier on a background patch only"),
    ("audit_chance", "chance (majority class)"),
    ("audit_corner_swap_changed", "predictions changed by pasting another class's overlay corner"),
    ("audit_corner_swap_to_donor", "… of which to the donor's class"),
    ("audit_background_swap_changed", "predictions changed by pasting another class's background"),
    ("audit_background_swap_to_donor", "… of which to the donor's class"),
    ("audit_overlay_heat_share", "share of the Grad-CAM heat in the overlay square"),
)


def _audit(tags: dict[str, str]) -> list[str]:
    """The shortcut audit of the version's run: its numbers and warnings (`audit.py`)."""
    from leukemia.tracking import SHORTCUT_TAG

    warnings = tags.get(SHORTCUT_TAG)
    if warnings is None:
        return ["Not recorded for this version."]
    rows = [(label, tags[key]) for key, label in AUDIT_LINES if key in tags]
    lines = [
        "| check | value |",
        "|---|---:|",
        *(f"| {label} | {value} |" for label, value in rows),
    ]
    found = [w for w in warnings.splitlines() if w.strip()]
    lines += ["", *(f"- ⚠ {w}" for w in found)] if found else ["", "- No warning."]
    return lines


#: What a referral means, on every card of a calibrated version.
REFERRAL = (
    "A **referred** image (its set holds more than one class, or its batch drifted) is labelled "
    "by a haematologist in Airflow before its result is used; the label trains the next model."
)


def _calibration(tags: dict[str, str]) -> list[str]:
    """The version's calibration and its prediction sets on the test split (`calibration.py`)."""
    from leukemia.calibration import Calibration

    cal = Calibration.from_tags(tags)
    if cal is None:
        return [
            "Not calibrated: the version was trained before calibration (or fine-tuned after "
            "it): its probabilities are the raw softmax and scoring refers no image by a "
            "prediction set."
        ]
    where = "out-of-fold" if cal.source == "cv" else "validation"
    test = {
        k: tags.get(f"test_{k}", "–")
        for k in (
            "ece",
            "coverage",
            "referral_rate",
            "mean_set_size",
            "unreferred_malignant_sensitivity",
            "unreferred_benign_specificity",
            "malignant_called_benign_unreferred",
        )
    }
    lines = [
        f"- **Temperature** T = {cal.temperature:.3f} (softmax of logits / T), fitted on "
        f"{cal.images} {where} images: ECE {cal.ece_before:.3f} → {cal.ece_after:.3f}, Brier "
        f"{cal.brier_before:.3f} → {cal.brier_after:.3f}.",
        f"- **Prediction sets** at coverage {cal.coverage:g} (`conformal_coverage`): threshold "
        f"q̂ = {cal.threshold:.4f}, a class is in the set when p ≥ 1 − q̂.",
        f"- **Test split**: ECE {test['ece']}, coverage {test['coverage']}, referral rate "
        f"{test['referral_rate']}, mean set size {test['mean_set_size']}; unreferred images: "
        f"malignant sensitivity {test['unreferred_malignant_sensitivity']}, benign specificity "
        f"{test['unreferred_benign_specificity']}, malignant called benign "
        f"{test['malignant_called_benign_unreferred']}.",
    ]
    if cal.threshold >= 1.0:
        lines.append(
            f"- ⚠ Threshold 1: {cal.images} held-out images are too few for coverage "
            f"{cal.coverage:g}, so every image is referred."
        )
    lines.append("")
    return [*lines, REFERRAL]


def _limits(params: dict[str, str], gate: dict[str, Any] | None) -> list[str]:
    weights = params.get("weights", "?")
    if weights == "none":
        weights_line = (
            "Weights: **none**, a randomly initialised VGG16 base (the embedded demo): its numbers "
            "say nothing about real images."
        )
    elif weights == "imagenet":
        weights_line = "Weights: VGG16 pretrained on ImageNet (natural photographs, not smears)."
    else:
        weights_line = f"Weights: the local VGG16 file `{weights}`."
    lines = [
        "- No patient identifiers: the split is per image (identical images kept together), so "
        "images of one patient can sit in both training and test; the test metrics are likely "
        "optimistic for a new patient.",
        "- One source hospital: the public ALL image data set comes from one laboratory (one "
        "stain, microscope and camera); performance on other sites is unknown until measured on "
        "their images.",
        f"- {weights_line}",
    ]
    if gate:
        n = gate["candidate"]["examples"]
        lines.append(
            f"- A small test split (n = {n}) gives wide intervals, and an interval of a metric at 0 "
            "or 1 collapses to a point: with n malignant images and none missed, the 95 % lower "
            "bound of the sensitivity is about 1 − 3/n (rule of three)."
        )
    return lines


def render(facts: CardFacts) -> str:
    """The card as Markdown."""
    gate = facts.gate
    sections = [
        f"# {facts.name} v{facts.version}: model card",
        "",
        f"Status: {_status(facts)}. Training run `{facts.run_id}`, DAG run "
        f"`{facts.tags.get('airflow_run_id', '') or 'none'}`.",
        "",
        "## Intended use",
        "",
        INTENDED_USE,
        "",
        "## Data",
        "",
        *_data(gate, facts.tags),
        "",
        "## Model",
        "",
        *_model(facts),
        "",
        "## Test metrics",
        "",
        *(metrics_table(gate) if gate else ["Not evaluated by the gate."]),
        "",
        "## Confusion matrix",
        "",
        *(_confusion(gate) if gate else ["Not evaluated by the gate."]),
        "",
        "## Calibration and referral",
        "",
        *_calibration(facts.tags),
        "",
        "## Selection, gate and decision",
        "",
        *_decisions(facts),
        "",
        "## Shortcut audit",
        "",
        *_audit(facts.tags),
        "",
        "## Known limits",
        "",
        *_limits(facts.params, gate),
    ]
    return "\n".join(sections) + "\n"


def description(card: str, card_url: str) -> str:
    """The registry description: the card, or its opening sections and a link when it is too long
    for MLflow's 5,000 characters."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    tail = f"\n\n… the full card: {card_url}\n"
    head = card[: card.index("## Known limits")] if "## Known limits" in card else card
    cut = head[: DESCRIPTION_LIMIT - len(tail)]
    return cut[: cut.rfind("\n## ")] + tail if "\n## " in cut else cut + tail


def gather(name: str, version: str) -> CardFacts:
    """The facts of one version from the registry and its runs (registry errors raise)."""
    import mlflow

    from leukemia import registry, tracking

    mlflow_client = registry.client()
    found = mlflow_client.get_model_version(name, version)
    run = mlflow_client.get_run(found.run_id)
    gate_run = found.tags.get("gate.evaluation_run_id")
    gate = mlflow.artifacts.load_dict(f"runs:/{gate_run}/gate.json") if gate_run else None
    url = tracking.run_url(run.info.experiment_id, run.info.run_id) + f"/artifacts/{CARD_FILE}"
    return CardFacts(
        name=name,
        version=str(version),
        run_id=str(found.run_id),
        tags=dict(found.tags),
        params=dict(run.data.params),
        gate=gate,
        card_url=url,
        aliases=list(getattr(found, "aliases", []) or []),
        metrics=dict(run.data.metrics),
    )


def write_card(name: str, version: str) -> str:
    """Render the card of one version, log it to its training run and set it as the version's
    description; returns the card's address in the MLflow UI."""
    from leukemia import registry

    facts = gather(name, version)
    card = render(facts)
    mlflow_client = registry.client()
    mlflow_client.log_text(facts.run_id, card, CARD_FILE)
    mlflow_client.update_model_version(name, version, description=description(card, facts.card_url))
    log.info("Model card of %s v%s: %s", name, version, facts.card_url)
    return facts.card_url
