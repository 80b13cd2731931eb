"""The model card: what a laboratory reads about a version, made from what was logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import quick_train_config

from leukemia.config import CLASSES
from leukemia.model_card import DESCRIPTION_LIMIT, CardFacts, description, render


def _evaluation(version: str, f1: float, matrix: list[list[int]]) -> dict[str, Any]:
    from leukemia.gate import REPORTED

    return {
        "version": version,
        "run_id": f"eval{version}",
        "metrics": {m: f1 for m in REPORTED},
        "intervals": {m: [f1 - 0.05, min(f1 + 0.03, 1.0)] for m in REPORTED},
        "confusion_matrix": matrix,
        "examples": sum(map(sum, matrix)),
        "url": f"http://mlflow:5000/#/experiments/1/runs/eval{version}",
    }


def _facts(**tags: str) -> CardFacts:
    matrix = [[20, 1, 0, 0], [0, 30, 2, 0], [0, 1, 28, 0], [0, 0, 0, 0]]
    gate = {
        "version": "7",
        "passed": True,
        "champion_note": "champion v6 re-evaluated on the same test split",
        "checks": [
            {
                "name": "min_f1_macro",
                "status": "passed",
                "line": "min_f1_macro: passed: macro-F1 0.9500 vs minimum 0.9",
            },
            {
                "name": "min_malignant_sensitivity",
                "status": "passed",
                "line": "min_malignant_sensitivity: passed: malignant sensitivity 1.0000 vs minimum 0.99",
            },
        ],
        "candidate": _evaluation("7", 0.95, matrix),
        "champion": _evaluation("6", 0.91, matrix),
        "provenance": {
            "source": "s3://leukemia-images/raw/",
            "digest": "ab" * 32,
            "images": 3242,
            "counts": {"train": dict.fromkeys(CLASSES, 500), "test": dict.fromkeys(CLASSES, 100)},
            "duplicate_groups": 40,
            "conflicts": 1,
        },
    }
    return CardFacts(
        name="leukemia-classifier",
        version="7",
        run_id="run7",
        tags={
            "selection": "best val_f1_macro 0.9600 of 9 configuration(s)",
            "config": "{}",
            **tags,
        },
        params={
            "weights": "imagenet",
            "variant": "seed",
            "optimizer": "adam",
            "batch_size": "16",
            "mask_overlay": "True",
            "augment_copies": "2",
            "augment_version": "v1",
        },
        gate=gate,
        card_url="http://mlflow:5000/#/experiments/1/runs/run7/artifacts/model_card.md",
    )


def test_card_has_every_section_a_laboratory_asks_for() -> None:
    card = render(_facts())
    for heading in (
        "Intended use",
        "Data",
        "Model",
        "Test metrics",
        "Confusion matrix",
        "Calibration and referral",
        "Selection, gate and decision",
        "Known limits",
    ):
        assert f"\n## {heading}\n" in card
    assert "**Not a diagnosis**" in card and "Decision support for research" in card
    assert "| source | s3://leukemia-images/raw/ |" in card
    assert "| images per class | Benign 600 · Early 600 · Pre 600 · Pro 600 |" in card
    assert "| duplicate groups | 40 " in card and "| label conflicts | 1 " in card
    assert "| weights | imagenet |" in card and "ImageNet" in card
    # what the model was protected by: the overlay mask and the stain/background augmentation
    assert "| mask_overlay | True |" in card and "| augment_copies | 2 |" in card
    assert "| augment_version | v1 |" in card
    assert "No patient identifiers: the split is per image" in card
    assert "One source hospital" in card


def test_card_shows_the_shortcut_audit_numbers_and_each_warning_of_the_version() -> None:
    card = render(
        _facts(
            shortcut_warnings="background patch: a forest reads 0.818 (chance 0.316)",
            audit_overlay_region_accuracy="0.2880",
            audit_background_region_accuracy="0.8180",
            audit_chance="0.3160",
            audit_corner_swap_changed="0.0000",
        )
    )
    audit = card[card.index("## Shortcut audit") : card.index("## Known limits")]
    assert "| classifier on the overlay corner only | 0.2880 |" in audit
    assert "| chance (majority class) | 0.3160 |" in audit
    assert "| predictions changed by pasting another class's overlay corner | 0.0000 |" in audit
    assert "- ⚠ background patch: a forest reads 0.818 (chance 0.316)" in audit
    clean = render(_facts(shortcut_warnings=""))
    assert "- No warning." in clean and "⚠" not in clean
    assert "Not recorded for this version." in render(_facts())


def test_card_shows_both_models_with_95_percent_intervals_and_the_confusion_matrix() -> None:
    card = render(_facts())
    assert "| metric | v7 | champion v6 |" in card
    assert "| macro-F1 | 0.950 (0.900–0.980) | 0.910 (0.860–0.940) |" in card
    assert "| malignant sensitivity | 0.950 (0.900–0.980) |" in card
    assert "| recall Pro | – (no test images) |" in card  # no Pro image in this test split
    assert "| Early | 0 | 30 | 2 | 0 |" in card
    assert (
        "[champion v6](http://mlflow:5000/#/experiments/1/runs/eval6/artifacts/confusion_matrix.png)"
        in card
    )


def test_card_shows_the_calibration_its_prediction_sets_and_what_a_referral_means() -> None:
    from leukemia.calibration import Calibration
    from leukemia.model_card import REFERRAL

    cal = Calibration(1.8, 0.62, 0.95, 1300, "cv", 0.041, 0.012, 0.08, 0.07)
    test = {
        "test_ece": "0.0150",
        "test_coverage": "0.9600",
        "test_referral_rate": "0.0800",
        "test_mean_set_size": "1.0900",
        "test_unreferred_malignant_sensitivity": "0.9980",
        "test_unreferred_benign_specificity": "0.9910",
        "test_malignant_called_benign_unreferred": "0.0000",
    }
    card = render(_facts(**cal.as_tags(), **test))
    section = card[card.index("## Calibration and referral") : card.index("## Selection")]
    for line in (
        "- **Temperature** T = 1.800 (softmax of logits / T), fitted on 1300 out-of-fold images: "
        "ECE 0.041 → 0.012, Brier 0.080 → 0.070.",
        "- **Prediction sets** at coverage 0.95 (`conformal_coverage`): threshold q̂ = 0.6200, "
        "a class is in the set when p ≥ 1 − q̂.",
        "- **Test split**: ECE 0.0150, coverage 0.9600, referral rate 0.0800, mean set size "
        "1.0900; unreferred images: malignant sensitivity 0.9980, benign specificity 0.9910, "
        "malignant called benign 0.0000.",
    ):
        assert line in section.splitlines(), line
    assert REFERRAL in section and "⚠" not in section
    few = render(_facts(**Calibration(1.2, 1.0, 0.95, 12, "val", 0.2, 0.1, 0.5, 0.4).as_tags()))
    assert "- ⚠ Threshold 1: 12 held-out images are too few for coverage 0.95" in few
    assert "Not calibrated: the version was trained before calibration" in render(_facts())


def test_card_says_where_the_version_stands() -> None:
    assert "**gate passed**: awaiting the decision" in render(_facts(gate="passed"))
    decided = render(
        _facts(
            gate="passed",
            decision="rejected",
            decided_by="dr-lee",
            decided_at="2026-11-27",
            review_comment="misses blasts",
        )
    )
    assert "Status: **rejected** by dr-lee" in decided and "(misses blasts)" in decided
    champion = _facts(decision="promoted", decided_by="dr-lee")
    champion.aliases = ["champion"]
    assert "Status: **@champion** (decided by dr-lee)" in render(champion)


def test_a_long_card_becomes_a_description_within_mlflows_limit_with_a_link() -> None:
    card = render(_facts())
    assert len(card) <= DESCRIPTION_LIMIT and description(card, "url") == card
    long = card + "x" * DESCRIPTION_LIMIT
    short = description(long, "http://mlflow/card")
    assert len(short) <= DESCRIPTION_LIMIT and short.endswith("the full card: http://mlflow/card\n")
    assert short.startswith("# leukemia-classifier v7: model card")


@pytest.mark.slow
def test_every_registered_version_gets_its_card_as_artifact_and_description(
    smear_dir: Path, mlflow_env: Path
) -> None:
    import mlflow

    from leukemia import promotion, registry, tracking
    from leukemia.gate import Thresholds
    from leukemia.runs import train_folder

    cfg = quick_train_config(48)  # the card / predictions do not depend on selection
    done = train_folder(
        smear_dir,
        cfg,
        mlflow_env,
        (0.5, 0.25, 0.25),
        "float32",
        tags={"airflow_run_id": "manual__1"},
    )
    decided = promotion.select_and_promote(
        tracking.setup(),
        done["split"].path,
        smear_dir,
        "manual__1",
        Thresholds(0.0, 0.0, 0.0, 0.0, 1.0),
    )
    version = registry.client().get_model_version("leukemia-classifier", decided["version"])
    card = mlflow.artifacts.load_text(f"runs:/{version.run_id}/model_card.md")
    assert version.description == card
    assert card.startswith(f"# leukemia-classifier v{decided['version']}: model card")
    assert "Status: **@champion** (decided by the gate)" in card
    assert "| weights | none |" in card and "randomly initialised" in card
    assert "- **Decision**: promoted by the gate" in card
    # calibrated on the few validation images (cv_folds 1): too few for 0.95, all referred
    assert "validation images: ECE" in card and "referral rate 1.0000" in card
    assert "- ⚠ Threshold 1:" in card
    assert decided["card_url"].endswith(f"/runs/{version.run_id}/artifacts/model_card.md")


def test_card_audit_rows_name_metrics_the_audit_logs() -> None:
    """A renamed audit metric must not silently vanish from the card."""
    from leukemia.audit import REGIONS, SWAPS
    from leukemia.model_card import AUDIT_LINES

    logged = {"chance", "overlay_heat_share"}
    logged |= {f"{r}_region_accuracy" for r in REGIONS}
    logged |= {f"{s}_swap_{k}" for s in SWAPS for k in ("changed", "to_donor")}
    assert {key.removeprefix("audit_") for key, _ in AUDIT_LINES} <= logged


def test_card_says_whether_the_base_was_frozen_or_which_blocks_were_fine_tuned_and_the_cost() -> (
    None
):
    frozen = render(_facts())
    assert "VGG16 preprocessing → frozen VGG16 base → pooling" in frozen
    assert "fine-tuned**" not in frozen
    facts = _facts()
    facts.params |= {
        "fine_tune_unfrozen": "block5",
        "fine_tune_source_used": "activations",
        "fine_tune_learning_rate": "1e-06",
        "epochs_run": "7",
        "source_run_id": "run5",
    }
    facts.metrics = {"fine_tune_seconds": 312.4}
    card = render(facts)
    assert (
        "VGG16 base: **block5 fine-tuned** with the head on the block-4 activations cached by the "
        "extraction, 7 epochs in 312 s (learning rate 1e-06), the earlier blocks frozen; run "
        "`run5` was the starting point." in card
    )
    assert "VGG16 preprocessing → VGG16 base → pooling" in card
