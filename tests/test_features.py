"""Cached base features: computed once per image in shard files, read back array by array, and the
head on them equals the full model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukemia.dataset import build_manifest
from leukemia.features import (
    CACHE_WIDTH,
    SHA_KEY,
    cache_index,
    extract_features,
    load_features,
    load_images,
    read_arrays,
    resolve_precision,
    shard_count,
    shard_of,
)
from leukemia.model import ModelConfig, assemble, build_head, build_trunk, feature_width
from leukemia.objectstore import open_store

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
    assert again.computed == 0 and again.cached == first.computed and again.parts_written == 0
    assert again.cache_dir == first.cache_dir
    parts = sorted(Path(first.cache_dir).glob("part-*.npz"))
    assert len(parts) == 1  # one shard file, not one file per image
    with np.load(parts[0]) as npz:
        assert {f"{k}" for k in npz.files} >= {SHA_KEY, "block5_pool_gmp", "block3_pool_gap"}
        assert sum(npz[k].shape[1] for k in npz.files if k != SHA_KEY) == CACHE_WIDTH
        assert npz["block5_pool_gmp"].dtype == np.float32
        assert sorted(s.decode() for s in npz[SHA_KEY]) == sorted(set(cached["shas"]))


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


def test_cache_is_keyed_by_the_overlay_mask(cached: dict) -> None:
    from leukemia.features import cache_dir_for

    masked = ModelConfig(input_size=SIZE, weights="none", mask_overlay=True)
    unmasked = ModelConfig(input_size=SIZE, weights="none", mask_overlay=False)
    assert cache_dir_for("c", masked, "float32").endswith(f"/none-{SIZE}px-float32-masked")
    assert cache_dir_for("c", unmasked, "bfloat16").endswith(f"/none-{SIZE}px-bfloat16")
    out = extract_features(
        cached["paths"][:2], cached["shas"][:2], unmasked, cached["root"], "float32"
    )
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
    assert bf.precision == "bfloat16" and bf.cache_dir.endswith("bfloat16-masked")
    a = load_features(cached["first"].cache_dir, shas, "multiscale")
    b = load_features(bf.cache_dir, shas, "multiscale")
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.03


def test_shards_split_the_images_and_each_shard_extracts_only_its_own(
    cached: dict, tmp_path: Path
) -> None:
    cfg = ModelConfig(input_size=SIZE, weights="none")
    shas = cached["shas"]
    slices = [shard_of(shas, i, 3) for i in range(3)]
    assert sorted(s for part in slices for s in part) == sorted(set(shas))
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    done = [
        extract_features(cached["paths"], shas, cfg, tmp_path, "float32", shard=i, shards=3)
        for i in range(3)
    ]
    assert [d.computed for d in done] == [len(p) for p in slices]
    assert len(list(Path(done[0].cache_dir).glob("part-*.npz"))) == 3
    index = cache_index(open_store(done[0].cache_dir))
    assert set(index) == set(shas)
    again = [
        extract_features(cached["paths"], shas, cfg, tmp_path, "float32", shard=i, shards=2)
        for i in range(2)
    ]
    assert [d.computed for d in again] == [0, 0]  # other shard boundaries: still nothing to do
    np.testing.assert_array_equal(
        load_features(done[0].cache_dir, shas, "multiscale"),
        load_features(cached["first"].cache_dir, shas, "multiscale"),
    )


def test_shard_count_is_automatic_from_the_images_and_capped() -> None:
    assert shard_count(0) == 1 and shard_count(1) == 1 and shard_count(500) == 1
    assert shard_count(501) == 2 and shard_count(10**7) == 64
    assert shard_count(10, requested=4) == 4 and shard_count(3, requested=8) == 3
    with pytest.raises(ValueError, match="extract_shards"):
        shard_count(10, requested=-1)


def test_reading_one_variant_reads_only_its_arrays(
    cached: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zipfile

    opened: list[str] = []
    real = zipfile.ZipFile.read
    monkeypatch.setattr(
        zipfile.ZipFile,
        "read",
        lambda self, name, pwd=None: opened.append(name) or real(self, name),
    )
    store = open_store(cached["first"].cache_dir)
    x = load_features(store.uri(), cached["shas"], "seed")
    assert x.shape == (len(cached["shas"]), 512)
    assert set(opened) == {"sha256.npy", "block5_pool_gmp.npy"}
    arrays = read_arrays(store, next(iter(store.list())), ["block4_pool_gap"])
    assert list(arrays) == ["block4_pool_gap"] and arrays["block4_pool_gap"].shape[1] == 512


def test_missing_cache_entries_are_reported(cached: dict) -> None:
    with pytest.raises(FileNotFoundError, match="no cached features"):
        load_features(cached["first"].cache_dir, ["0" * 64], "seed")


def test_precision_values() -> None:
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("auto") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_precision("fp8")


def test_augmented_copies_are_extracted_for_the_named_images_only_and_once(
    cached: dict, tmp_path: Path
) -> None:
    from leukemia.features import augmented_dir, load_copies

    cfg = ModelConfig(input_size=SIZE, weights="none")
    shas, augment = cached["shas"], sorted(set(cached["shas"]))[:5]
    first = extract_features(
        cached["paths"], shas, cfg, tmp_path, "float32", augment=augment, copies=2
    )
    assert first.copies == 2 and first.augmented == 2 * len(augment)
    for copy in range(2):
        index = cache_index(open_store(augmented_dir(first.cache_dir, copy)))
        assert sorted(index) == augment  # the test images (not named) get no copy
    assert set(cache_index(open_store(first.cache_dir))) == set(shas)  # originals unchanged
    again = extract_features(
        cached["paths"], shas, cfg, tmp_path, "float32", augment=augment, copies=2
    )
    assert again.computed == 0 and again.augmented == 0 and again.parts_written == 0
    copies = load_copies(first.cache_dir, augment, "seed", 2)
    originals = load_features(first.cache_dir, augment, "seed")
    assert copies.shape == (2, len(augment), 512)
    assert not np.allclose(copies[0], originals) and not np.allclose(copies[0], copies[1])
    with pytest.raises(FileNotFoundError, match=r"augment_copies \(3\)"):
        load_copies(first.cache_dir, augment, "seed", 3)


def test_augmented_copies_reuse_each_decoded_image_and_equal_copies_from_fresh_reads(
    cached: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leukemia import features, objectstore
    from leukemia.features import load_copies

    cfg = ModelConfig(input_size=SIZE, weights="none")
    shas, augment = cached["shas"], sorted(set(cached["shas"]))[:6]
    reads: list[int] = []
    real_read_all = objectstore.read_all  # what `load_images` reads through
    monkeypatch.setattr(objectstore, "read_all", lambda p: reads.append(len(p)) or real_read_all(p))
    kept = extract_features(
        cached["paths"], shas, cfg, tmp_path / "kept", "float32", augment=augment, copies=2
    )
    assert sum(reads) == len(set(shas))  # every image read once, its two copies from memory
    reads.clear()
    monkeypatch.setattr(features, "MEMO_BYTES", 0)  # nothing kept: each copy reads again
    fresh = extract_features(
        cached["paths"], shas, cfg, tmp_path / "fresh", "float32", augment=augment, copies=2
    )
    assert sum(reads) == len(set(shas)) + 2 * len(augment)
    np.testing.assert_array_equal(
        load_copies(kept.cache_dir, augment, "multiscale", 2),
        load_copies(fresh.cache_dir, augment, "multiscale", 2),
    )


def test_cached_block4_activations_equal_block4_output_within_float16_rounding(
    cached: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tolerance: float16 keeps 11 significant bits, so each cached value is within 2**-11 of the
    float32 one relatively (rtol 1e-3), or within float16's spacing near zero (atol 1e-3 of the
    largest value)."""
    from leukemia import objectstore
    from leukemia.features import ACTIVATION_KEYS, load_activations
    from leukemia.model import build_preprocess

    cfg = ModelConfig(input_size=SIZE, weights="none")
    reads: list[int] = []
    real_read_all = objectstore.read_all  # what `load_images` reads through
    monkeypatch.setattr(objectstore, "read_all", lambda p: reads.append(len(p)) or real_read_all(p))
    out = extract_features(
        cached["paths"], cached["shas"], cfg, tmp_path, "float32", activations=True
    )
    shas = sorted(set(cached["shas"]))
    assert out.computed == len(shas) and out.activations
    assert sum(reads) == len(shas)  # features and activations from one pass over the pixels
    acts = load_activations(out.cache_dir, shas)
    assert set(acts) == set(ACTIVATION_KEYS)
    assert acts["block4_pool"].dtype == np.float16 and acts["block4_pool"].shape[1:] == (3, 3, 512)
    path = dict(zip(cached["shas"], cached["paths"], strict=True))
    pixels = load_images([path[s] for s in shas], SIZE)
    block3, block4, _ = build_trunk(cfg)(build_preprocess(SIZE, cfg.mask_overlay)(pixels))
    direct = np.asarray(block4)
    np.testing.assert_allclose(
        acts["block4_pool"].astype("float32"), direct, rtol=1e-3, atol=1e-3 * np.abs(direct).max()
    )
    assert np.abs(direct).max() > 0  # a real comparison, not of zeros
    # block 3's pooled outputs are stored beside them, equal to the cached features' columns
    multiscale = load_features(out.cache_dir, shas, "multiscale")
    np.testing.assert_array_equal(acts["block3_pool_gap"], multiscale[:, :256])
    np.testing.assert_array_equal(acts["block3_pool_gmp"], multiscale[:, 256:512])
    np.testing.assert_allclose(acts["block3_pool_gap"], np.asarray(block3).mean((1, 2)), rtol=1e-4)


def test_activations_of_cached_features_and_augmented_copies_are_computed_once(
    cached: dict, tmp_path: Path
) -> None:
    from leukemia.features import activations_dir, augmented_dir, load_activations, load_copies

    cfg = ModelConfig(input_size=SIZE, weights="none")
    shas, augment = cached["shas"], sorted(set(cached["shas"]))[:4]
    plain = extract_features(
        cached["paths"], shas, cfg, tmp_path, "float32", augment=augment, copies=1
    )
    parts = sorted(Path(plain.cache_dir).glob("part-*.npz"))
    # features cached before: only the activations are computed, the feature files stay as they are
    out = extract_features(
        cached["paths"], shas, cfg, tmp_path, "float32", augment=augment, copies=1, activations=True
    )
    assert out.computed == len(set(shas)) and out.augmented == len(augment)
    assert sorted(Path(plain.cache_dir).glob("part-*.npz")) == parts
    assert Path(activations_dir(augmented_dir(out.cache_dir, 0))).is_dir()
    copy = load_activations(augmented_dir(out.cache_dir, 0), augment)
    np.testing.assert_array_equal(
        copy["block3_pool_gap"], load_copies(out.cache_dir, augment, "multiscale", 1)[0][:, :256]
    )
    with pytest.raises(FileNotFoundError, match="no cached block-4 activations"):
        load_activations(augmented_dir(out.cache_dir, 0), sorted(set(shas))[4:5])
    again = extract_features(
        cached["paths"], shas, cfg, tmp_path, "float32", augment=augment, copies=1, activations=True
    )
    assert again.computed == 0 and again.augmented == 0 and again.parts_written == 0


def test_a_changed_mask_or_weights_file_keys_another_activation_cache(
    cached: dict, tmp_path: Path
) -> None:
    import keras

    from leukemia.features import activations_dir, cache_dir_for, cache_key

    masked = ModelConfig(input_size=SIZE, weights="none", mask_overlay=True)
    unmasked = ModelConfig(input_size=SIZE, weights="none", mask_overlay=False)
    a, b = (activations_dir(cache_dir_for(tmp_path, c, "float32")) for c in (masked, unmasked))
    assert a != b and a.startswith(cache_dir_for(tmp_path, masked, "float32"))
    paths, shas = cached["paths"][:2], cached["shas"][:2]
    first = extract_features(paths, shas, masked, tmp_path, "float32", activations=True)
    other = extract_features(paths, shas, unmasked, tmp_path, "float32", activations=True)
    assert first.computed == other.computed == 2  # the unmasked activations are not reused
    # a weights file keys the cache by its content: rewritten, it keys another folder
    weights = tmp_path / "vgg16.weights.h5"
    keras.utils.set_random_seed(1)
    keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3)).save_weights(
        weights
    )
    cfg = ModelConfig(input_size=SIZE, weights=str(weights))
    before = activations_dir(cache_dir_for(tmp_path, cfg, "float32"))
    done = extract_features(paths, shas, cfg, tmp_path, "float32", activations=True)
    keras.utils.set_random_seed(2)
    keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3)).save_weights(
        weights
    )
    after = activations_dir(cache_dir_for(tmp_path, cfg, "float32"))
    assert after != before
    again = extract_features(paths, shas, cfg, tmp_path, "float32", activations=True)
    assert done.computed == again.computed == 2
    # the cache folder names its key: what fine-tuning re-derives from it
    assert cache_key(first.cache_dir, masked) == (str(tmp_path), "float32", "")
    with pytest.raises(ValueError, match="not a feature cache"):
        cache_key(first.cache_dir, unmasked)


# --- precision and extraction backends ------------------------------------------------------------


def test_an_explicit_bfloat16_is_refused_where_onednn_cannot_run_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from leukemia import features

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN then has no bfloat16 path
    assert features.cpu_bf16() is False
    monkeypatch.setattr(features, "bf16_supported", lambda: False)  # and no GPU
    with pytest.raises(ValueError, match="bfloat16 needs a GPU or a CPU with AVX-512 BF16"):
        resolve_precision("bfloat16")
    assert resolve_precision("auto") == resolve_precision("float32") == "float32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    monkeypatch.setattr(features.Path, "read_text", lambda self: "flags: fpu avx512_bf16 avx2")
    assert features.cpu_bf16() is True


def test_keras_cache_folders_keep_their_names_and_int8_ones_name_their_network() -> None:
    from leukemia.backends import Calibration, features_key
    from leukemia.features import backend_of, cache_dir_for, cache_key

    cfg = ModelConfig(input_size=SIZE, weights="none", backend="int8")
    keras = cache_dir_for("s3://b/features", cfg, "float32")
    assert keras == f"s3://b/features/none-{SIZE}px-float32-masked"  # as before the backend
    ones, zeros = (Calibration.from_pixels(np.full((2, 4, 4, 3), v)) for v in (1, 0))
    key = features_key(cfg, ones)
    assert key != features_key(cfg, zeros) and len(key) == 16
    int8 = cache_dir_for("s3://b/features", cfg, "float32", key)
    assert int8 == f"s3://b/features/none-{SIZE}px-int8-{key}-masked"
    assert int8 == cache_dir_for("s3://b/features", cfg, "bfloat16", key)  # no precision in it
    assert (backend_of(keras), backend_of(int8)) == ("keras", "int8")
    assert cache_key(int8, cfg) == ("s3://b/features", "float32", key)
    assert cache_key(int8, cfg).backend == "int8" and cache_key(keras, cfg).backend == "keras"
    with pytest.raises(ValueError, match="not a feature cache"):
        cache_key(int8.replace("-masked", ""), cfg)


def test_int8_asked_where_it_cannot_run_extracts_into_the_keras_folder_with_one_line(
    cached: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from leukemia import backends

    real = backends.importlib.util.find_spec
    monkeypatch.setattr(
        backends.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "openvino" else real(name, *a),
    )
    cfg = ModelConfig(input_size=SIZE, weights="none", backend="int8")
    with caplog.at_level(logging.WARNING):
        out = extract_features(
            cached["paths"], cached["shas"], cfg, cached["root"], "float32", augment=cached["shas"]
        )
    assert out.backend == "keras" and out.cache_dir == cached["first"].cache_dir
    assert out.computed == 0 and out.reference == 0  # the Keras features, already cached
    assert [r.getMessage() for r in caplog.records] == [
        "int8 backend unavailable (openvino not installed (pip install -r requirements.txt)): "
        "extracting with keras float32"
    ]


@pytest.mark.skipif(
    not __import__("leukemia.backends").backends.available(), reason="OpenVINO/NNCF not installed"
)
def test_int8_extraction_caches_the_int8_features_and_the_test_images_float32_ones(
    smear_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leukemia import backends
    from leukemia.features import build_extractor, cache_dir_for, reference_dir

    monkeypatch.setenv("LEUKEMIA_DATA_DIR", str(tmp_path / "data"))  # the worker's int8 cache
    records = build_manifest(smear_dir)
    paths, shas = [smear_dir / r.path for r in records], [r.sha256 for r in records]
    train, test = shas[:16], shas[16:]
    cfg = ModelConfig(input_size=32, weights="none", backend="int8")
    root = tmp_path / "features"
    out = extract_features(paths, shas, cfg, root, "float32", augment=train, reference=test)
    calibration = backends.training_calibration(dict(zip(shas, paths, strict=True)), train, 32)
    assert calibration is not None and calibration.images == tuple(
        (str(paths[shas.index(s)]), s) for s in sorted(train)
    )
    key = backends.features_key(cfg, calibration)
    assert out.backend == "int8" and out.computed == len(shas) and out.reference == len(test)
    assert out.cache_dir == cache_dir_for(root, cfg, "float32", key)
    int8 = backends.int8_extractor(cfg, calibration, backends.cache_root())
    pixels = load_images(paths, 32)
    expected = int8.predict_on_batch(pixels)
    cached = load_features(out.cache_dir, shas, "multiscale")
    np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    fp32 = np.asarray(build_extractor(cfg, "float32").predict_on_batch(pixels[16:]))
    reference = load_features(reference_dir(out.cache_dir, cfg), test, "multiscale")
    np.testing.assert_allclose(reference, fp32, rtol=1e-5, atol=1e-5 * np.abs(fp32).max())
    assert not np.allclose(reference, cached[16:], rtol=1e-4)  # two trunks, not one twice

    def no_derivation(*args: object) -> None:
        raise AssertionError("the worker's cached int8 network was derived again")

    monkeypatch.setattr(backends, "quantize_model", no_derivation)
    again = extract_features(paths, shas, cfg, root, "float32", augment=train, reference=test)
    assert (again.backend, again.computed, again.cache_dir) == ("int8", 0, out.cache_dir)
