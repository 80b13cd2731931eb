"""The shortcut audit: its geometry and arithmetic, and, on synthetic smears whose only label cue is a
class-correlated overlay, that it flags the shortcut with masking off and not with masking on, and
that a masked model ignores swapped overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from leukemia.audit import (
    AuditConfig,
    as_model_sees,
    flip_rates,
    overlay_heat_share,
    pick_donors,
    region_box,
    region_features,
    sample_rows,
    shortcut_warnings,
    swap_box,
    swap_scores,
)
from leukemia.model import OVERLAY_FILL

SIZE = 64


def test_regions_and_swaps_sit_where_the_overlay_and_the_background_are() -> None:
    assert region_box("overlay", 224) == (slice(192, 224), slice(192, 224))
    assert region_box("background", 224) == (slice(0, 32), slice(0, 32))
    assert swap_box("corner", 224) == region_box("overlay", 224)
    assert swap_box("background", 224) == (slice(0, 32), slice(0, 64))
    with pytest.raises(ValueError, match="overlay, background"):
        region_box("centre", 224)


def test_model_view_fills_only_the_overlay_square() -> None:
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    seen = as_model_sees(pixels, mask_overlay=True)
    np.testing.assert_array_equal(seen[:, :54], pixels[:, :54])
    np.testing.assert_array_equal(seen[:, :, :54], pixels[:, :, :54])
    assert (seen[:, 54:, 54:] == np.asarray(OVERLAY_FILL, dtype="float32")).all()
    np.testing.assert_array_equal(as_model_sees(pixels, mask_overlay=False), pixels)


def test_region_features_average_a_region_down_to_a_small_grid() -> None:
    pixels = np.zeros((3, 224, 224, 3), dtype="float32")
    pixels[:, 192:, 192:] = 7.0
    feats = region_features(pixels, region_box("overlay", 224))
    assert feats.shape == (3, 8 * 8 * 3) and (feats == 7.0).all()


def test_donors_are_images_of_another_class_and_repeat_with_the_seed() -> None:
    labels = np.array([0, 0, 1, 2, 3, 3, 1])
    donors = pick_donors(labels, seed=3)
    assert (labels[donors] != labels).all()
    np.testing.assert_array_equal(donors, pick_donors(labels, seed=3))
    assert (pick_donors(np.array([2, 2, 2])) == -1).all()  # one class: nobody to swap with


def test_the_sample_is_of_one_split_bounded_and_the_same_whatever_the_row_order() -> None:
    rows = [{"split": "test" if i % 3 else "train", "sha256": f"{i:04x}"} for i in range(30)]
    sample = sample_rows(rows, "test", 5, seed=1)
    assert len(sample) == 5 and {r["split"] for r in sample} == {"test"}
    assert sample == sample_rows(list(reversed(rows)), "test", 5, seed=1)
    assert len(sample_rows(rows, "train", 100)) == 10  # fewer than asked: all of them


def test_flip_rates_count_changes_and_changes_to_the_donors_class() -> None:
    before = np.array([0, 1, 2, 3])
    after = np.array([0, 2, 3, 3])
    donor_labels = np.array([1, 2, 0, 0])
    assert flip_rates(before, after, donor_labels) == (0.5, 0.25)


def test_swaps_read_the_pasted_patch_and_skip_the_model_where_it_masks_it() -> None:
    # a "model" that answers the class written in the corner's red channel, and counts its calls
    calls = []

    def by_corner(pixels: np.ndarray) -> np.ndarray:
        calls.append(len(pixels))
        return np.rint(pixels[:, -1, -1, 0] / 50).astype("int64")

    labels = np.array([0, 1, 2, 3] * 3)
    pixels = np.full((12, SIZE, SIZE, 3), 128.0, dtype="float32")
    pixels[:, 54:, 54:, 0] = (labels * 50)[:, None, None]
    pixels[:, :10, :10] = np.arange(12)[:, None, None, None]  # backgrounds differ, unread
    off = swap_scores(by_corner, pixels, labels, mask_overlay=False, seed=0)
    assert off["corner_swap_changed"] == 1.0 and off["corner_swap_to_donor"] == 1.0
    assert off["background_swap_changed"] == 0.0 and off["swap_images"] == 12
    assert calls == [12, 12, 12]  # before, corner, background
    calls.clear()
    on = swap_scores(by_corner, pixels, labels, mask_overlay=True, seed=0)
    assert on["corner_swap_changed"] == 0.0 and calls == [12, 12]  # the corner swap is not run


def test_heat_share_is_the_share_of_the_map_inside_the_overlay_square() -> None:
    uniform = np.ones((1, 224, 224))
    assert overlay_heat_share(uniform) == pytest.approx(32 * 32 / 224**2)
    corner = np.zeros((2, 224, 224))
    corner[:, 200:, 200:] = 1.0
    corner[1] = 0.0  # a flat map explains nothing and is left out
    assert overlay_heat_share(corner) == 1.0


def test_each_check_over_its_limit_gives_one_warning_line() -> None:
    settings = AuditConfig(region_margin=0.1, max_flip_rate=0.01, max_overlay_heat=0.1)
    quiet = {
        "chance": 0.3,
        "overlay_region_accuracy": 0.35,
        "background_region_accuracy": 0.4,
        "corner_swap_changed": 0.01,
        "corner_swap_to_donor": 0.0,
        "background_swap_changed": 0.0,
        "background_swap_to_donor": 0.0,
        "overlay_heat_share": 0.05,
        "overlay_area_share": 0.02,
    }
    assert shortcut_warnings(quiet, settings) == []
    loud = {
        **quiet,
        "overlay_region_accuracy": 0.8,
        "corner_swap_changed": 0.03,
        "corner_swap_to_donor": 0.02,
        "overlay_heat_share": 0.3,
    }
    lines = shortcut_warnings(loud, settings)
    assert len(lines) == 3
    assert (
        lines[0].startswith("overlay region") and "0.80" in lines[0] and "chance 0.30" in lines[0]
    )
    assert lines[1].startswith("corner swap") and "3.0%" in lines[1] and "2.0%" in lines[1]
    assert lines[2].startswith("Grad-CAM") and "30.0%" in lines[2]
    # a masked model reads nothing in the square: heat there is not a warning
    masked = shortcut_warnings({**loud, "overlay_masked": 1.0}, settings)
    assert len(masked) == 2 and not any(w.startswith("Grad-CAM") for w in masked)


def test_audit_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="images"):
        AuditConfig(images=-1)


# --- end to end on smears whose only label cue is the overlay -------------------------------------


@pytest.fixture(scope="module")
def overlay_only(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Smears whose cells come from a random class and whose overlay follows the label; per mask
    setting, a multiscale head trained on the cached features of a random trunk, the full model and
    its audit."""
    from leukemia.audit import audit_model
    from leukemia.dataset import make_split, read_split
    from leukemia.dev.synthetic import generate
    from leukemia.features import extract_features
    from leukemia.model import ModelConfig, assemble, build_trunk
    from leukemia.training import TrainConfig, fit_head, split_arrays

    root = tmp_path_factory.mktemp("overlay-only")
    generate(root / "images", 60, size=SIZE, seed=5, overlay=True, informative_cells=False)
    rows = read_split(make_split(root / "images", root / "split", fractions=(0.5, 0.2, 0.3)).path)
    out: dict = {"rows": rows, "images": root / "images"}
    for mask in (False, True):
        model_cfg = ModelConfig(SIZE, "none", variant="multiscale", mask_overlay=mask)
        paths = [root / "images" / r["path"] for r in rows]
        ex = extract_features(
            paths, [r["sha256"] for r in rows], model_cfg, root / "features", "float32"
        )
        data = split_arrays(rows, ex.cache_dir, "multiscale")
        head, _ = fit_head(
            TrainConfig(epochs=40, model=model_cfg), *data["train"][:2], *data["val"][:2]
        )
        full = assemble(model_cfg, build_trunk(model_cfg), head)
        result = audit_model(
            full, rows, root / "images", mask, AuditConfig(images=200, gradcam_images=4)
        )
        out[mask] = {"result": result, "full": full}
    return out


@pytest.mark.slow
def test_audit_flags_the_overlay_shortcut_when_masking_is_off(overlay_only: dict) -> None:
    result = overlay_only[False]["result"]
    m = result.metrics
    test = [r for r in overlay_only["rows"] if r["split"] == "test"]
    assert m["test_images"] == m["swap_images"] == len(test)
    assert m["overlay_region_accuracy"] >= 0.9 and m["overlay_region_accuracy"] >= m["chance"] + 0.5
    # measured: forest 1.00 against chance 0.30; 93 % of predictions changed, 90 % to the donor's
    assert m["corner_swap_changed"] >= 0.5 and m["corner_swap_to_donor"] >= 0.4
    assert 0 <= m["overlay_heat_share"] <= 1 and m["gradcam_images"] == 4
    assert any(w.startswith("overlay region") for w in result.warnings)
    assert any(w.startswith("corner swap") for w in result.warnings)
    assert len(result.overlays) == 4 and result.overlays[0].shape == (SIZE, SIZE, 3)


@pytest.mark.slow
def test_audit_does_not_flag_the_overlay_when_masking_is_on(overlay_only: dict) -> None:
    result = overlay_only[True]["result"]
    m = result.metrics
    # the square is one colour for every image: a forest on it can do no better than one class
    assert m["overlay_region_accuracy"] <= m["chance"]
    assert m["corner_swap_changed"] == 0.0 and m["corner_swap_to_donor"] == 0.0
    assert not any(w.startswith(("overlay region", "corner swap")) for w in result.warnings)


@pytest.mark.slow
def test_masked_model_ignores_swapped_overlays_and_unmasked_one_does_not(
    overlay_only: dict,
) -> None:
    from leukemia.audit import swapped
    from leukemia.features import labels_to_index, load_images

    test = [r for r in overlay_only["rows"] if r["split"] == "test"]
    pixels = load_images([overlay_only["images"] / r["path"] for r in test], SIZE)
    donors = pick_donors(labels_to_index([r["label"] for r in test]), seed=1)
    changed = swapped(pixels, donors, "corner")
    assert np.abs(changed - pixels).max() > 100  # the overlays really differ
    masked = overlay_only[True]["full"]
    np.testing.assert_allclose(
        masked.predict(changed, verbose=0), masked.predict(pixels, verbose=0), atol=1e-6
    )
    unmasked = overlay_only[False]["full"]
    before = unmasked.predict(pixels, verbose=0).argmax(axis=1)
    after = unmasked.predict(changed, verbose=0).argmax(axis=1)
    assert (before != after).mean() >= 0.5  # the same swap moves the shortcut model


# --- the DAG's audit step on a logged, head-only training run --------------------------------------


@pytest.mark.slow
def test_audit_step_logs_metrics_artifacts_and_the_warning_tag_to_the_candidate_run(
    smear_dir: Path, mlflow_env: Path
) -> None:
    import mlflow

    from leukemia import runs
    from leukemia.model import ModelConfig
    from leukemia.tasks import training_dag as steps
    from leukemia.training import TrainConfig

    # the audit step reads the run's model, not how it was selected: no CV, no augmented copies
    cfg = TrainConfig(
        batch_size=8, epochs=2, cv_folds=1, augment_copies=0, model=ModelConfig(48, "none")
    )
    tags = {"airflow_run_id": "manual__1"}
    done = runs.train_folder(smear_dir, cfg, mlflow_env, (0.5, 0.25, 0.25), "float32", tags)
    run_id = done["result"].run_id
    candidate = steps.select_candidate("manual__1")
    assert candidate["run_id"] == run_id
    split = {"path": str(done["split"].path), "images_uri": str(smear_dir)}

    out = steps.audit(candidate, split, images=5)
    assert out["run_id"] == run_id and len(json.dumps(out)) < 3000  # small: fits in XCom
    metrics = out["audit"]["metrics"]
    assert metrics["test_images"] == 5 and metrics["train_images"] == 5
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["audit_corner_swap_changed"] == pytest.approx(
        metrics["corner_swap_changed"], abs=1e-4
    )
    assert run.data.tags["shortcut_warnings"] == "\n".join(out["audit"]["warnings"])
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "audit")}
    assert logged == {"audit/shortcut_audit.md", "audit/shortcut_audit.json", "audit/gradcam.png"}
    # a retried task returns what was logged instead of auditing again
    again = steps.audit(candidate, split, images=5)
    assert again["audit"]["warnings"] == out["audit"]["warnings"]
    assert again["audit"]["metrics"]["corner_swap_changed"] == metrics["corner_swap_changed"]
    assert steps.audit(candidate, split, images=0) == {**candidate, "audit": None}


def test_the_mask_is_found_inside_the_nested_model() -> None:
    from leukemia.audit import masks_overlay
    from leukemia.model import ModelConfig, build_model

    assert masks_overlay(build_model(ModelConfig(32, "none", mask_overlay=True)))
    assert not masks_overlay(build_model(ModelConfig(32, "none", mask_overlay=False)))
