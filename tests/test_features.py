"""Cached base features: computed once per image, and the head on them equals the full model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukemia.dataset import build_manifest
from leukemia.features import (
    CACHE_WIDTH,
    extract_features,
    load_features,
    load_images,
    resolve_precision,
)
from leukemia.model import ModelConfig, assemble, build_head, build_trunk, feature_width

SIZE = 48


@pytest.fixture(scope="module")
def cached(smear_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    records = build_manifest(smear_dir)
    root = tmp_path_factory.mktemp("features")
    cfg = ModelConfig(input_size=SIZE, weights="none")
    paths = [smear_dir / r.path for r in records]
    shas = [r.sha256 for r in records]
    first = extract_features(paths, shas, cfg, root, precision="float32", batch_size=8)
    return {"records": records, "root": root, "paths": paths, "shas": shas, "first": first}


def test_features_are_computed_once(cached: dict) -> None:
    first = cached["first"]
    assert first.computed == len(set(cached["shas"])) and first.cached == 0
    cfg = ModelConfig(
        input_size=SIZE, weights="none", variant="multiscale"
    )  # other variant: same cache
    again = extract_features(
        cached["paths"], cached["shas"], cfg, cached["root"], precision="float32"
    )
    assert again.computed == 0 and again.cached == first.computed
    assert again.cache_dir == first.cache_dir
    row = np.load(Path(first.cache_dir) / f"{cached['shas'][0]}.npy")
    assert row.shape == (CACHE_WIDTH,) and row.dtype == np.float32


def test_only_new_images_are_computed(cached: dict, tmp_path: Path) -> None:
    from PIL import Image

    new = tmp_path / "new.jpg"
    Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8)).save(new)
    cfg = ModelConfig(input_size=SIZE, weights="none")
    # the same image twice (a duplicate pair) is computed once
    out = extract_features(
        [*cached["paths"], new, new],
        [*cached["shas"], "f" * 64, "f" * 64],
        cfg,
        cached["root"],
        "float32",
    )
    assert out.computed == 1


def test_cache_is_keyed_by_size_and_precision(cached: dict, tmp_path: Path) -> None:
    cfg = ModelConfig(input_size=64, weights="none")
    out = extract_features(cached["paths"][:2], cached["shas"][:2], cfg, cached["root"], "float32")
    assert out.computed == 2 and out.cache_dir != cached["first"].cache_dir


@pytest.mark.parametrize("variant", ["seed", "multiscale"])
def test_head_on_cached_features_equals_full_model_on_images(cached: dict, variant: str) -> None:
    import keras

    cfg = ModelConfig(input_size=SIZE, weights="none", variant=variant)
    x = load_features(cached["first"].cache_dir, cached["shas"], variant)
    assert x.shape == (len(cached["shas"]), feature_width(variant))
    norm = keras.layers.Normalization()
    norm.adapt(x)
    head = build_head(cfg, norm)
    head.compile("adam", "sparse_categorical_crossentropy")
    head.fit(x, np.arange(len(x)) % 4, epochs=2, verbose=0)
    on_features = head.predict(x, verbose=0)
    full = assemble(cfg, build_trunk(cfg), head)
    on_images = full.predict(load_images(cached["paths"], SIZE), verbose=0)
    np.testing.assert_allclose(on_images, on_features, atol=2e-5, rtol=1e-4)
    assert on_features.std() > 0.01  # a trained head, not a constant


def test_bfloat16_features_are_close_to_float32(cached: dict) -> None:
    cfg = ModelConfig(input_size=SIZE, weights="none")
    paths, shas = cached["paths"][:8], cached["shas"][:8]
    bf = extract_features(paths, shas, cfg, cached["root"], precision="bfloat16")
    assert bf.precision == "bfloat16" and bf.cache_dir.endswith("bfloat16")
    a = load_features(cached["first"].cache_dir, shas, "multiscale")
    b = load_features(bf.cache_dir, shas, "multiscale")
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.03


def test_missing_cache_entries_are_reported(cached: dict) -> None:
    with pytest.raises(FileNotFoundError, match="no cached features"):
        load_features(cached["first"].cache_dir, ["0" * 64], "seed")


def test_precision_values() -> None:
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("auto") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_precision("fp8")
