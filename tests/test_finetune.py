"""Fine-tuning from pixels: only the unfrozen VGG16 blocks (and the head) change; the flips and
rotations act while training and never at inference; the fine-tuned run logs a full model that
loads in safe mode and reproduces its logged metrics; the stage is off unless asked for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from leukemia.finetune import FineTuneConfig, build_finetune_model, fit_pixels, predict_pixels
from leukemia.model import ModelConfig

SIZE = 32


def _model(blocks: int = 1) -> tuple[object, FineTuneConfig]:
    import keras

    from leukemia.model import build_head

    cfg = ModelConfig(SIZE, "none")
    keras.utils.set_random_seed(0)
    ft = FineTuneConfig(blocks=blocks, learning_rate=1e-3, epochs=1, batch_size=4)
    return build_finetune_model(cfg, build_head(cfg), ft), ft


def _weights(model: object) -> dict[str, np.ndarray]:
    return {w.path: np.array(w.numpy()) for w in model.weights}  # type: ignore[attr-defined]


def test_only_the_last_blocks_of_the_trunk_are_trainable() -> None:
    for blocks, names in ((1, {"block5"}), (2, {"block4", "block5"})):
        model, ft = _model(blocks)
        trunk = model.get_layer("vgg16_trunk")
        trained = {w.path.split("/")[0] for w in trunk.trainable_weights}
        assert {n.split("_")[0] for n in trained} == names == set(ft.unfrozen)
        assert len(trunk.trainable_weights) == 6 * blocks  # 3 conv layers x (kernel, bias)
        assert not model.get_layer("preprocess").trainable_weights
    with pytest.raises(ValueError, match="blocks must be 1-5"):
        FineTuneConfig(blocks=0)


def test_one_epoch_changes_block5_and_the_head_but_no_earlier_block() -> None:
    model, ft = _model()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype="uint8")
    y = np.asarray([0, 1, 2, 3] * 2)
    before = _weights(model)
    epochs: list[int] = []
    history = fit_pixels(model, ft, x, y, x[:4], y[:4], on_epoch=lambda e, logs: epochs.append(e))
    assert epochs == [0] and len(history["val_loss"]) == 1
    after = _weights(model)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert any(p.startswith("block5_conv") for p in changed)
    assert any(p.startswith("dense_") or "probabilities" in p for p in changed)  # the head trains
    frozen = [p for p in before if p.startswith(("block1", "block2", "block3", "block4"))]
    assert len(frozen) == 20 and not changed & set(frozen)
    assert not {p for p in changed if "preprocess" in p or "overlay" in p or "standardize" in p}


def test_augmentation_acts_in_training_and_never_at_inference() -> None:
    from leukemia.model import assemble

    model, _ = _model()
    x = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3), dtype="uint8")
    first, second = predict_pixels(model, x), predict_pixels(model, x)
    np.testing.assert_array_equal(first, second)
    # the same trunk and head without the random layers give the same predictions
    plain = assemble(
        ModelConfig(SIZE, "none"), model.get_layer("vgg16_trunk"), model.get_layer("head")
    )
    np.testing.assert_allclose(first, plain.predict_on_batch(x.astype("float32")), atol=1e-6)
    trained = np.asarray(model(x.astype("float32"), training=True))
    assert not np.allclose(trained, first, atol=1e-6)  # flips and rotations are really there
    from leukemia.gradcam import GradCam  # Grad-CAM skips them too

    np.testing.assert_allclose(GradCam(model)(x)[1], first, atol=1e-5)


@pytest.fixture()
def source_run(smear_dir: Path, mlflow_env: Path) -> dict:
    from leukemia.runs import train_folder
    from leukemia.training import TrainConfig

    cfg = TrainConfig(optimizer="adam", batch_size=8, epochs=2, model=ModelConfig(48, "none"))
    done = train_folder(smear_dir, cfg, mlflow_env, (0.5, 0.25, 0.25), "float32")
    info = done["split"]
    return {
        "candidate": {"run_id": done["result"].run_id},
        "split_info": {"path": info.path, "images_uri": str(smear_dir), "digest": info.digest},
        "rows": done["rows"],
    }


@pytest.mark.slow
def test_fine_tuned_run_logs_a_model_that_loads_in_safe_mode_and_reproduces_its_metrics(
    source_run: dict, smear_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import keras
    import mlflow

    from leukemia.evaluation import evaluate
    from leukemia.features import labels_to_index, load_images
    from leukemia.registry import MODEL_FILE
    from leukemia.tasks.training_dag import fine_tune
    from leukemia.tracking import log_full_model

    candidate, split_info = source_run["candidate"], source_run["split_info"]
    assert fine_tune(candidate, split_info, enabled=False) == candidate  # off: nothing runs
    assert len(mlflow.search_runs(output_format="list")) == 1
    with caplog.at_level(logging.INFO, logger="leukemia.finetune"):
        out = fine_tune(
            candidate, split_info, enabled=True, epochs=2, patience=5, learning_rate=1e-4
        )
    info = out["fine_tune"]
    epochs = [r.message for r in caplog.records if r.message.startswith("Fine-tuning epoch")]
    assert [m.split(":")[0] for m in epochs] == [
        "Fine-tuning epoch 1/2",
        "Fine-tuning epoch 2/2",
    ]
    assert out["run_id"] == (info["run_id"] if info["chosen"] else candidate["run_id"])
    assert info["chosen"] == (info["val_f1_macro"] > info["source_val_f1_macro"])
    run = mlflow.get_run(info["run_id"])
    tags = run.data.tags
    assert tags["kind"] == "fine_tune" and tags["fine_tune"] == "true"
    assert tags["source_run_id"] == candidate["run_id"] and tags["model_uri"] == info["model_uri"]
    assert json.loads(tags["config"])["variant"] == "seed"
    assert (
        run.data.params["fine_tune_unfrozen"] == "block5" and run.data.params["epochs_run"] == "2"
    )
    history = mlflow.MlflowClient().get_metric_history(info["run_id"], "val_loss")
    assert [m.step for m in history] == [0, 1]
    # a gate registers it like any run: log_full_model returns the model the run logged
    assert log_full_model(info["run_id"], smear_dir, split_info["path"]) == info["model_uri"]
    folder = Path(mlflow.artifacts.download_artifacts(info["model_uri"]))
    model = keras.saving.load_model(folder / MODEL_FILE, safe_mode=True)
    test_rows = [r for r in source_run["rows"] if r["split"] == "test"]
    pixels = load_images([smear_dir / r["path"] for r in test_rows], 48)
    probs = np.asarray(model.predict(pixels, verbose=0))
    np.testing.assert_allclose(np.asarray(model.predict(pixels, verbose=0)), probs, atol=1e-6)
    metrics = evaluate(labels_to_index([r["label"] for r in test_rows]), probs)["metrics"]
    assert metrics["f1_macro"] == pytest.approx(run.data.metrics["test_f1_macro"])
    assert metrics["log_loss"] == pytest.approx(run.data.metrics["test_log_loss"], rel=1e-4)
    # the trunk's block5 moved away from the shared frozen trunk, block1 did not
    from leukemia.model import build_trunk

    frozen = build_trunk(ModelConfig(48, "none"))
    tuned = model.get_layer("vgg16_trunk")
    for name, moved in (("block5_conv3", True), ("block1_conv1", False)):
        same = np.array_equal(tuned.get_layer(name).kernel, frozen.get_layer(name).kernel)
        assert same is not moved, name
