"""Fine-tuning: from pixels, only the unfrozen VGG16 blocks (and the head) change and the flips and
rotations act while training and never at inference; from cached block-4 activations, block 5 and
the head train, blocks 1-4 do not, each epoch shows every training image once (original or copy),
and the assembled pixels-to-softmax model gives the cached path's probabilities; from block-3
activations, blocks 4-5 train and their tail gives the extractor's features; the fine-tuned
run (either source) logs a full model that loads in safe mode and reproduces its logged metrics;
the stage is off unless asked for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from leukemia.finetune import (
    FineTuneConfig,
    activation_batches,
    build_finetune_model,
    fit_pixels,
    load_activation_splits,
    predict_pixels,
    tune_activations,
)
from leukemia.model import ModelConfig
from leukemia.training import TrainConfig

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


def test_the_source_is_activations_for_block5_only_unless_pixels_are_asked_for() -> None:
    assert FineTuneConfig().source == "auto" and FineTuneConfig().from_activations
    assert not FineTuneConfig(blocks=2).from_activations  # auto: deeper unfreezing needs pixels
    assert not FineTuneConfig(source="pixels").from_activations
    assert FineTuneConfig(source="activations").source_used == "activations"
    with pytest.raises(ValueError, match="trains block5 only"):
        FineTuneConfig(blocks=2, source="activations")
    with pytest.raises(ValueError, match="source must be one of"):
        FineTuneConfig(source="features")


def test_the_fine_tuned_model_wins_on_validation_macro_f1_then_cross_entropy() -> None:
    from leukemia.finetune import fine_tune_wins

    def outcome(f1: float, ce: float, source_f1: float | None, source_ce: float) -> dict:
        keys = ("val_f1_macro", "val_cross_entropy", "source_val_f1_macro")
        return {
            **dict(zip(keys, (f1, ce, source_f1), strict=True)),
            "source_val_cross_entropy": source_ce,
        }

    assert fine_tune_wins(outcome(0.99, 0.09, 0.98, 0.05))  # higher macro-F1 wins
    assert not fine_tune_wins(outcome(0.97, 0.01, 0.98, 0.05))  # lower macro-F1 loses
    assert fine_tune_wins(outcome(0.98, 0.046, 0.98, 0.053))  # a tie: the lower cross-entropy
    assert not fine_tune_wins(outcome(0.98, 0.053, 0.98, 0.053))  # a full tie keeps the source
    assert fine_tune_wins(outcome(0.5, 1.0, None, float("nan")))  # nothing to beat


def test_each_epoch_shows_every_training_image_once_as_its_original_or_a_copy() -> None:
    n = 10
    versions = [
        {"block4_pool": np.full((n, 1), float(v)) + np.arange(n)[:, None] * 10} for v in (0, 1, 2)
    ]
    epochs = activation_batches(versions, np.arange(n), batch_size=4, seed=0)
    seen = []
    for _ in range(3):
        batches = list(epochs())
        x = np.concatenate([b["block4_pool"][:, 0] for b, _ in batches])
        y = np.concatenate([labels for _, labels in batches])
        assert sorted(y) == list(range(n)) and x.dtype == np.float32
        np.testing.assert_array_equal(x // 10, y)  # each row is its own image's, in some version
        seen.append(x % 10)
    assert not np.array_equal(seen[0], seen[1])  # each epoch draws the versions anew
    assert set(np.concatenate(seen)) == {0.0, 1.0, 2.0}
    plain = [b["block4_pool"][:, 0] for b, _ in activation_batches(versions, np.arange(n), 4)()]
    np.testing.assert_array_equal(np.concatenate(plain), np.arange(n) * 10)  # in order, originals


@pytest.fixture(scope="module")
def activations(smear_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Features and block-4 activations (one augmented copy of the train and val images) of the
    synthetic images at 48 px, float32, and a split of them: 4 train, 1 val, 1 test per class."""
    from leukemia.dataset import build_manifest
    from leukemia.features import extract_features

    records = build_manifest(smear_dir)
    rows = [
        {"path": r.path, "label": r.label, "sha256": r.sha256, "split": split}
        for r, split in zip(records, (["train"] * 4 + ["val", "test"]) * 4, strict=True)
    ]
    cfg = TrainConfig(augment_copies=1, model=ModelConfig(48, "none", variant="multiscale"))
    done = extract_features(
        [smear_dir / r["path"] for r in rows],
        [r["sha256"] for r in rows],
        cfg.model,
        tmp_path_factory.mktemp("features"),
        "float32",
        augment=[r["sha256"] for r in rows if r["split"] != "test"],
        copies=1,
        activations=True,
    )
    return {"cfg": cfg, "rows": rows, "cache_dir": done.cache_dir}


@pytest.fixture(scope="module")
def tuned_block5(activations: dict) -> dict:
    from leukemia.model import build_head

    cfg = activations["cfg"]
    data = load_activation_splits(cfg, activations["rows"], activations["cache_dir"])
    import keras

    keras.utils.set_random_seed(0)
    head = build_head(cfg.model)
    before = _weights(head)
    ft = FineTuneConfig(learning_rate=1e-3, epochs=2, batch_size=4, patience=5)
    epochs: list[dict] = []
    tuned = tune_activations(cfg, head, data, ft, on_epoch=lambda e, logs: epochs.append(logs))
    return {"tuned": tuned, "head_before": before, "epochs": epochs, "data": data}


def test_from_activations_block5_and_the_head_train_and_blocks_1_to_4_do_not(
    activations: dict, tuned_block5: dict
) -> None:
    from leukemia.model import build_trunk

    tuned, data = tuned_block5["tuned"], tuned_block5["data"]
    versions, _ = data["train"]
    assert len(versions) == 2 and versions[0]["block4_pool"].shape == (16, 3, 3, 512)
    assert [round(e["epoch_seconds"] >= 0) for e in tuned_block5["epochs"]] == [1, 1]
    assert len(tuned.history["val_loss"]) == len(tuned.epoch_seconds) == 2
    # the starting point is measured the way the epochs are: the source head on the activations
    assert tuned.val_start > 0 and tuned.val_best == min(tuned.history["val_cross_entropy"])
    fresh = build_trunk(activations["cfg"].model)
    kernels = {
        layer.name: np.array_equal(layer.kernel, tuned.trunk.get_layer(layer.name).kernel)
        for layer in fresh.layers
        if layer.name.endswith(tuple(f"conv{i}" for i in (1, 2, 3)))
    }
    assert len(kernels) == 13
    assert not any(same for name, same in kernels.items() if name.startswith("block5"))
    assert all(same for name, same in kernels.items() if not name.startswith("block5"))
    after = _weights(tuned.head)
    assert any(not np.array_equal(w, after[p]) for p, w in tuned_block5["head_before"].items())


def test_the_assembled_model_gives_the_cached_paths_probabilities(
    activations: dict, tuned_block5: dict, smear_dir: Path, tmp_path: Path
) -> None:
    """Tolerance 1e-3: the cached path reads block 4's output rounded to float16 (2**-11
    relative); the assembled model computes it in float32 from the pixels."""
    import keras

    from leukemia.features import load_images
    from leukemia.gradcam import GradCam
    from leukemia.model import assemble

    tuned = tuned_block5["tuned"]
    cached = np.asarray(tuned.head.predict(tuned.data["test"][0], verbose=0))
    test = [r for r in activations["rows"] if r["split"] == "test"]
    pixels = load_images([smear_dir / r["path"] for r in test], 48)
    full = assemble(activations["cfg"].model, tuned.trunk, tuned.head)
    full.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    on_pixels = np.asarray(loaded.predict(pixels, verbose=0))
    np.testing.assert_allclose(on_pixels, cached, atol=1e-3)
    assert np.abs(cached - 0.25).max() > 1e-3  # not a flat softmax
    _, probs = GradCam(loaded)(pixels)
    np.testing.assert_allclose(probs, on_pixels, atol=1e-5)


def test_blocks_4_5_train_on_block3_activations_and_their_tail_gives_the_extractors_features(
    activations: dict, smear_dir: Path
) -> None:
    """The bench's deeper step (bench/finetune_blocks45.py): `build_tail(blocks=2)` on an image's
    `block3_pool` output computes the extractor's features exactly (float32 both ways), and one epoch
    moves blocks 4 and 5 and the head, never blocks 1-3."""
    import keras

    from leukemia.features import labels_to_index, load_images
    from leukemia.model import build_extractor, build_head, build_tail, build_trunk, tail_layers

    cfg, rows = activations["cfg"], activations["rows"]
    pixels = load_images([smear_dir / r["path"] for r in rows], 48)
    features, block3 = build_extractor(cfg.model, "float32", True, "block3_pool").predict(
        pixels, verbose=0
    )
    assert block3.shape == (len(rows), 6, 6, 256)
    tail = build_tail(cfg.model, build_trunk(cfg.model), "float32", blocks=2)
    np.testing.assert_allclose(
        tail.predict({"block3_pool": block3}, verbose=0), features, atol=1e-5
    )
    data = {}
    for split in ("train", "val", "test"):
        idx = [i for i, r in enumerate(rows) if r["split"] == split]
        y = labels_to_index([rows[i]["label"] for i in idx])
        data[split] = ([{"block3_pool": block3[idx]}], y)
    keras.utils.set_random_seed(0)
    ft = FineTuneConfig(learning_rate=1e-3, epochs=1, batch_size=4)
    tuned = tune_activations(cfg, build_head(cfg.model), data, ft, blocks=2)
    fresh = build_trunk(cfg.model)
    moved = {
        layer.name
        for layer in fresh.layers
        if layer.name.endswith(("conv1", "conv2", "conv3"))
        and not np.array_equal(layer.kernel, tuned.trunk.get_layer(layer.name).kernel)
    }
    assert moved == {n for n in tail_layers(2) if "conv" in n}  # block4_conv1 ... block5_conv3
    assert tuned.data["test"][0].shape == (4, 2560)
    with pytest.raises(ValueError, match="blocks 5 \\(1\\) or 4-5 \\(2\\)"):
        tail_layers(3)


@pytest.fixture(scope="module")
def source_once(smear_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The run fine-tuning starts from, trained once for the module in a store of its own."""
    from conftest import store_at

    from leukemia.runs import train_folder

    workdir = tmp_path_factory.mktemp("source")
    cfg = TrainConfig(optimizer="adam", batch_size=8, epochs=2, model=ModelConfig(48, "none"))
    with store_at(workdir):
        done = train_folder(smear_dir, cfg, workdir, (0.5, 0.25, 0.25), "float32")
    return {"workdir": workdir, **done}


@pytest.fixture()
def source_run(source_once: dict, smear_dir: Path, mlflow_env: Path) -> dict:
    """The module's source run in this test's own copy of the store (the test logs runs to it)."""
    from conftest import clone_workdir

    from leukemia import tracking

    clone_workdir(source_once["workdir"], mlflow_env)
    tracking.setup()
    info = source_once["split"]
    return {
        "candidate": {"run_id": source_once["result"].run_id},
        "split_info": {
            "path": info.path.replace(str(source_once["workdir"]), str(mlflow_env)),
            "images_uri": str(smear_dir),
            "digest": info.digest,
        },
        "rows": source_once["rows"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("source", ["activations", "pixels"])
def test_fine_tuned_run_logs_a_model_that_loads_in_safe_mode_and_reproduces_its_metrics(
    source: str, source_run: dict, smear_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import keras
    import mlflow

    from leukemia.evaluation import evaluate
    from leukemia.features import labels_to_index, load_images
    from leukemia.finetune import fine_tune_candidate
    from leukemia.registry import MODEL_FILE
    from leukemia.tasks.training_dag import fine_tune
    from leukemia.tracking import log_full_model

    candidate, split_info = source_run["candidate"], source_run["split_info"]
    assert fine_tune(candidate, split_info) == candidate  # off by default: nothing runs
    assert len(mlflow.search_runs(output_format="list")) == 1
    ft = FineTuneConfig(epochs=2, patience=5, learning_rate=1e-4, source=source)
    with caplog.at_level(logging.INFO, logger="leukemia.finetune"):
        out = fine_tune_candidate(candidate, split_info["path"], split_info["images_uri"], ft)
    info = out["fine_tune"]
    epochs = [r.message for r in caplog.records if r.message.startswith("Fine-tuning epoch")]
    assert [m.split(":")[0] for m in epochs] == [
        "Fine-tuning epoch 1/2",
        "Fine-tuning epoch 2/2",
    ]
    # the source run's extraction cached no activations: fine-tuning computed them, and says so
    second_pass = [r for r in caplog.records if "second pass" in r.message]
    assert len(second_pass) == (source == "activations") and info["source"] == source
    assert out["run_id"] == (info["run_id"] if info["chosen"] else candidate["run_id"])
    before = (info["source_val_f1_macro"], -info["source_val_cross_entropy"])
    assert info["chosen"] == ((info["val_f1_macro"], -info["val_cross_entropy"]) > before)
    run = mlflow.get_run(info["run_id"])
    tags = run.data.tags
    assert tags["kind"] == "fine_tune" and tags["fine_tune"] == "true"
    assert tags["source_run_id"] == candidate["run_id"] and tags["model_uri"] == info["model_uri"]
    assert tags["fine_tune_source"] == source and "calibration_temperature" in tags
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
    # from activations the logged metrics read block 4's output rounded to float16
    rel = 1e-4 if source == "pixels" else 1e-2
    assert metrics["log_loss"] == pytest.approx(run.data.metrics["test_log_loss"], rel=rel)
    assert "temperature" in {layer.name for layer in model.get_layer("head").layers}
    # the trunk's block5 moved away from the shared frozen trunk, block1 did not
    from leukemia.model import build_trunk

    frozen = build_trunk(ModelConfig(48, "none"))
    tuned = model.get_layer("vgg16_trunk")
    for name, moved in (("block5_conv3", True), ("block1_conv1", False)):
        same = np.array_equal(tuned.get_layer(name).kernel, frozen.get_layer(name).kernel)
        assert same is not moved, name


def test_the_extraction_plan_caches_activations_only_when_block5_is_fine_tuned_from_them(
    tmp_path: Path,
) -> None:
    from leukemia.tasks.training_dag import RunRequest, plan_extraction

    split_info = {"work_uri": str(tmp_path), "images": 10}
    asked = {
        "off": RunRequest(weights="none"),
        "block5": RunRequest(weights="none", fine_tune=True),
        "pixels": RunRequest(weights="none", fine_tune=True, fine_tune_source="pixels"),
        "blocks 4-5": RunRequest(weights="none", fine_tune=True, fine_tune_blocks=2),
    }
    cached = {k: plan_extraction(split_info, r)[0]["activations"] for k, r in asked.items()}
    assert cached == {"off": False, "block5": True, "pixels": False, "blocks 4-5": False}


@pytest.mark.slow
def test_the_dag_steps_fine_tune_block5_from_the_activations_their_extraction_cached(
    source_run: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """The extract step of a run with fine_tune on caches the activations in the same pass, so
    the fine_tune step (its settings from the run's request) makes no second pass."""
    import mlflow

    from leukemia.features import cache_key
    from leukemia.tasks.training_dag import RunRequest, extract, fine_tune
    from leukemia.tracking import run_config
    from leukemia.watch import FEATURES_TAG

    candidate, split_info = source_run["candidate"], source_run["split_info"]
    source = mlflow.get_run(candidate["run_id"])
    cfg, cache_dir = run_config(source), source.data.tags[FEATURES_TAG]
    root, precision, _ = cache_key(cache_dir, cfg.model)
    shard = {"shard": 0, "shards": 1, "cache_root": root, "cache_dir": cache_dir}
    shard |= {"weights": "none", "input_size": 48, "precision": precision, "activations": True}
    shard |= {"augment_copies": cfg.augment_copies, "mask_overlay": cfg.model.mask_overlay}
    done = extract(split_info, shard)
    assert done["activations"] and done["computed"] == len(source_run["rows"])
    request = RunRequest(fine_tune=True, fine_tune_epochs=1, fine_tune_learning_rate=1e-4)
    with caplog.at_level(logging.INFO, logger="leukemia.finetune"):
        out = fine_tune(candidate, split_info, request)
    assert not [r for r in caplog.records if "second pass" in r.message]
    info = out["fine_tune"]
    assert info["source"] == "activations" and info["epochs_run"] == 1
    params = mlflow.get_run(info["run_id"]).data.params
    assert params["fine_tune_learning_rate"] == "0.0001" and params["fine_tune_source"] == "auto"
