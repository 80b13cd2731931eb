"""Extraction backends: the Keras extractor as it is (`keras`), or an int8 copy of it (`int8`).

The int8 extractor is derived from the float32 Keras extractor (`features.build_extractor`: overlay
mask and VGG16 preprocessing → frozen trunk → every pooled output) by post-training quantization
with OpenVINO and NNCF: the 13 convolutions run in int8 (weights per output channel, activations per
tensor, ranges calibrated on a given set of images), the mask, the preprocessing (two fixed Dense
layers) and the pooling stay float32. It takes the same raw pixels and returns the same outputs as
the Keras extractor (`predict_on_batch`), so extraction can use either.

The derivation is deterministic (the same source network, calibration images and toolchain give
the same int8 network) and cached on local disk under `<cache root>/int8-<key>/`, `key` hashing the
source network's identity (weights, input size, mask), the calibration images' identity, the
toolchain's versions and `DERIVATION`: a folder that may be empty, never a hand-off between tasks.
The source of truth stays the float32 Keras network.

`extractor_for` is what extraction calls: it returns the int8 extractor when asked and possible,
else the Keras one, with one log line saying why, and always the backend it actually returns, so
that the caller keys its cache and logs its configuration by the numbers it gets. Extraction
calibrates on `training_calibration` of the split (a seeded sample of its train and val images).

`serving_int8` is what scoring and `predict` call for a model whose run trained on int8 features:
the same derivation, from the registered model's own preprocessing and trunk (`model_extractor`:
the `.keras` model stays the source of truth) and the calibration images the run logged
(`CALIBRATION_ARTIFACT`), so the head is fed the numbers it was trained on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leukemia.config import BACKENDS, data_dir
from leukemia.errors import first_line
from leukemia.model import ModelConfig
from leukemia.weights import weights_identity

log = logging.getLogger(__name__)

KERAS, INT8 = BACKENDS  # the extraction backends (`config.BACKENDS`), the default first
#: The packages the int8 backend needs (installed with the pinned versions of requirements.txt).
TOOLCHAIN: tuple[str, ...] = ("openvino", "nncf")
#: Training images the int8 ranges are calibrated on by default (NNCF's own default subset size).
CALIBRATION_IMAGES = 300
CALIBRATION_SEED = 0
#: Version of the derivation below: bump it when a change to it changes the int8 network, so that
#: cached int8 networks are derived again.
DERIVATION = 1
MODEL_FILE = "model.xml"
#: The sub-folder of a worker's local folder (LEUKEMIA_DATA_DIR) that holds its int8 networks.
CACHE_FOLDER = "extractors"
#: Where a run that serves on int8 features logs the images its int8 network is calibrated on.
CALIBRATION_ARTIFACT = "int8/calibration.json"
#: OpenVINO's CPU settings: float32 wherever the network is not int8 (OpenVINO would otherwise round
#: those parts to bfloat16 on some CPUs), and parallel streams (one per core here): 1.17 times the
#: images/s of one stream over both cores (bench/backends.py's machine, measured under load).
CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"}


class BackendUnavailable(RuntimeError):
    """The int8 backend cannot run here; the message says why in one line."""


@dataclass(frozen=True)
class Calibration:
    """The images an int8 network is calibrated on: a stable identity (part of the cache key) and
    a loader of their raw pixels (n, size, size, 3), float32 0-255, called only on a cache miss;
    calibration on image files also keeps them (`size`, `images`: (path, sha256) pairs) so that
    a run can log them (`to_json`) and scoring calibrate on the same (`from_json`)."""

    identity: str
    load: Callable[[], Any]
    size: int = 0
    images: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @classmethod
    def from_pixels(cls, pixels: Any) -> Calibration:
        """Calibration on pixels in memory; the identity hashes their values."""
        import numpy as np

        array = np.ascontiguousarray(pixels, dtype="float32")
        digest = hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()
        return cls(f"pixels-{digest[:16]}", lambda: array)

    @classmethod
    def from_images(
        cls, paths: Sequence[str | Path], shas: Sequence[str], size: int
    ) -> Calibration:
        """Calibration on image files (paths or `s3://` URIs, one per sha256); the identity hashes
        the sha256s in order and the size, so the images are read only when the network is derived."""
        from leukemia.images import load_images

        if len(paths) != len(shas) or not shas:
            raise ValueError(f"calibration needs one sha256 per path, got {len(paths)}/{len(shas)}")
        digest = hashlib.sha256(f"{size}\n{chr(10).join(shas)}".encode()).hexdigest()
        images = tuple((str(p), s) for p, s in zip(paths, shas, strict=True))
        return cls(f"images-{digest[:16]}", lambda: load_images(list(paths), size), size, images)

    def to_json(self) -> str:
        """The identity, size and images of a calibration on image files, as JSON."""
        if not self.images:
            raise ValueError("only a calibration on image files (from_images) can be written")
        about = {"identity": self.identity, "size": self.size, "images": list(self.images)}
        return json.dumps(about, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """The calibration `to_json` wrote (its identity checked)."""
        about = json.loads(text)
        paths, shas = zip(*about["images"], strict=True)
        found = cls.from_images(paths, shas, int(about["size"]))
        if found.identity != about["identity"]:
            raise ValueError(f"calibration {about['identity']} reads back as {found.identity}")
        return found


def training_calibration(
    paths: Mapping[str, str | Path], training: Sequence[str], size: int
) -> Calibration | None:
    """The calibration of an int8 network for a split: `calibration_sample` of its training
    images `training` (sha256s; the train and val images), read from `paths` (sha256 → path or
    URI) at `size` px; None without training images. Extraction and scoring both call it, so
    they calibrate on the same images."""
    sample = calibration_sample(training)
    return Calibration.from_images([paths[s] for s in sample], sample, size) if sample else None


def cache_root() -> Path:
    """This worker's folder of int8 networks: local, a cache that may be empty at any task."""
    return data_dir() / CACHE_FOLDER


def calibration_sample(
    shas: Sequence[str], n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED
) -> list[str]:
    """A seeded sample of `n` of the distinct sha256s (all of them when fewer), sorted: the same
    images whatever the order of `shas`."""
    unique = sorted(set(shas))
    return sorted(random.Random(seed).sample(unique, min(n, len(unique))))


def toolchain_versions() -> dict[str, str]:
    """Installed version of each `TOOLCHAIN` package ("missing" when absent); imports nothing."""
    out = {}
    for name in TOOLCHAIN:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def unavailable_reason() -> str | None:
    """Why the int8 backend cannot run here, or None when it can (toolchain and a CPU device)."""
    missing = [name for name in TOOLCHAIN if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -r requirements.txt)"
    try:
        import openvino as ov

        devices = ov.Core().available_devices
    except Exception as exc:  # a broken install or an unsupported CPU: the same answer
        return f"OpenVINO cannot start: {first_line(exc)}"
    if "CPU" not in devices:
        return f"OpenVINO has no CPU device here (devices: {', '.join(devices) or 'none'})"
    return None


def available() -> bool:
    """True when the int8 backend can run here."""
    return unavailable_reason() is None


def extractor_source(cfg: ModelConfig, activations: bool = False) -> str:
    """Identity of the float32 Keras extractor of `cfg` (what the int8 network is derived from)."""
    return (
        f"extractor:{weights_identity(cfg.weights)}:{cfg.input_size}px:"
        f"mask={cfg.mask_overlay}:activations={activations}"
    )


def int8_key(source: str, calibration: str) -> str:
    """Cache key of an int8 network: its source network, calibration, toolchain and derivation."""
    text = json.dumps(
        {
            "source": source,
            "calibration": calibration,
            "toolchain": toolchain_versions(),
            "derivation": DERIVATION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Int8Extractor:
    """A compiled int8 network: `predict_on_batch(pixels)` gives what the Keras extractor's does
    (one float32 array, or a list of them for a network with several outputs). A batch is split
    over the compiled network's parallel streams (`CPU_CONFIG`), one per core on a small CPU."""

    def __init__(self, compiled: Any, key: str, folder: Path) -> None:
        import openvino as ov

        self.compiled, self.key, self.folder = compiled, key, folder
        streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(compiled, max(1, streams))
        self._outputs = len(compiled.outputs)

    def predict_on_batch(self, pixels: Any) -> Any:
        """Raw RGB pixels (n, size, size, 3), 0-255 → the network's outputs, float32."""
        import numpy as np

        pixels = np.ascontiguousarray(pixels, dtype="float32")
        chunks = [c for c in np.array_split(pixels, len(self._queue)) if len(c)]
        results: list[list[Any]] = [[] for _ in chunks]

        def done(request: Any, i: int) -> None:
            results[i] = [np.array(request.get_output_tensor(k).data) for k in range(self._outputs)]

        self._queue.set_callback(done)
        for i, chunk in enumerate(chunks):
            self._queue.start_async({0: chunk}, i)
        self._queue.wait_all()
        out = [np.concatenate([r[k] for r in results]) for k in range(self._outputs)]
        return out[0] if self._outputs == 1 else out


def _toolchain() -> tuple[Any, Any]:
    """`openvino` and `nncf`, NNCF's usage telemetry off (a laboratory network sends nothing out)."""
    os.environ.setdefault("NNCF_CI", "1")  # NNCF's own switch: no telemetry session is started
    import nncf
    import openvino as ov

    return ov, nncf


def quantize_model(model: Any, calibration: Any) -> Any:
    """The int8 OpenVINO network of a Keras model from raw pixels, calibrated on `calibration`
    (pixels, one image per calibration step): convolutions int8, the Dense layers and the rest
    float32. Deterministic for the same model, pixels and toolchain."""
    ov, nncf = _toolchain()
    with tempfile.TemporaryDirectory(prefix="leukemia-int8-") as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)  # read by OpenVINO's runtime
        source = ov.Core().read_model(tmp)
    items = [image[None] for image in calibration]
    return nncf.quantize(
        source,
        nncf.Dataset(items),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        target_device=nncf.TargetDevice.CPU,
        subset_size=len(items),
        ignored_scope=nncf.IgnoredScope(types=["MatMul"]),  # mask and preprocessing stay exact
    )


def compile_int8(folder: Path, key: str) -> Int8Extractor:
    """The cached int8 network in `folder`, compiled for this CPU (float32 outside the int8 ops)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(folder / MODEL_FILE), "CPU", CPU_CONFIG)
    return Int8Extractor(compiled, key, folder)


def derive_int8(
    build: Callable[[], Any], source: str, calibration: Calibration, cache_root: str | Path
) -> Int8Extractor:
    """The int8 network of the Keras model `build()` (named `source`), from the cache under
    `cache_root` or derived, calibrated and cached (written whole, then renamed into place)."""
    key = int8_key(source, calibration.identity)
    folder = Path(cache_root) / f"int8-{key}"
    if not (folder / MODEL_FILE).is_file():
        ov, _ = _toolchain()
        log.info("Deriving the int8 network of %s (calibration %s)", source, calibration.identity)
        quantized = quantize_model(build(), calibration.load())
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".int8-{key}-", dir=folder.parent))
        ov.save_model(quantized, tmp / MODEL_FILE, compress_to_fp16=False)
        about = {"source": source, "calibration": calibration.identity, **toolchain_versions()}
        (tmp / "source.json").write_text(json.dumps(about, indent=1) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process cached the same network first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return compile_int8(folder, key)


def keras_extractor(cfg: ModelConfig, precision: str, activations: bool = False) -> Any:
    """`model.build_extractor`; with `activations`, the one that also returns block 4's output
    (an extractor that cannot says so in one line)."""
    from leukemia.model import build_extractor

    if not activations:
        return build_extractor(cfg, precision)
    try:
        return build_extractor(cfg, precision, activations)  # type: ignore[call-arg]
    except TypeError:
        raise ValueError("this extractor cannot return block 4's activations yet") from None


def int8_extractor(
    cfg: ModelConfig, calibration: Calibration, cache_root: str | Path, activations: bool = False
) -> Int8Extractor:
    """The int8 copy of `keras_extractor(cfg, "float32", activations)`."""
    return derive_int8(
        lambda: keras_extractor(cfg, "float32", activations),
        extractor_source(cfg, activations),
        calibration,
        cache_root,
    )


def features_key(cfg: ModelConfig, calibration: Calibration) -> str:
    """The key of the int8 network whose features `features.cache_dir_for` keys a folder by: the
    one without block 4's output (the network with it gives the same features)."""
    return int8_key(extractor_source(cfg), calibration.identity)


def _fall_back(reason: str, precision: str) -> str:
    """Say in one warning line why extraction goes on with Keras at `precision`; `keras`."""
    log.warning("int8 backend unavailable (%s): extracting with keras %s", reason, precision)
    return KERAS


def usable_backend(backend: str, calibration: Calibration | None, precision: str) -> str:
    """`backend`, or `keras` (one warning line says why) when int8 cannot run here or has no
    calibration images. Checks only the toolchain: deriving may still fail (`extractor_for`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == INT8:
        reason = unavailable_reason()
        if reason is None and calibration is None:
            reason = "no calibration images given"
        if reason is not None:
            return _fall_back(reason, precision)
    return backend


def extractor_for(
    backend: str,
    cfg: ModelConfig,
    precision: str,
    calibration: Calibration | None,
    cache_root: str | Path,
    activations: bool = False,
) -> tuple[Any, str]:
    """(extractor, backend used): the int8 extractor for `int8` where it can run, else the Keras
    extractor in `precision` (one warning line says why the int8 one could not be had)."""
    if usable_backend(backend, calibration, precision) == INT8:
        try:
            return int8_extractor(cfg, calibration, cache_root, activations), INT8
        except Exception as exc:  # conversion, calibration or compilation: same fallback
            _fall_back(f"cannot derive or compile the int8 network: {first_line(exc)}", precision)
    return keras_extractor(cfg, precision, activations), KERAS


def agreement(head: Any, reference: Any, candidate: Any) -> dict[str, float]:
    """How far a head's answers move between two feature matrices of the same images (float32 vs
    int8 features): the share of images with the same argmax, the largest absolute difference of
    any class probability, and the number of images."""
    import numpy as np

    p = np.asarray(head.predict_on_batch(np.asarray(reference, dtype="float32")))
    q = np.asarray(head.predict_on_batch(np.asarray(candidate, dtype="float32")))
    if p.shape != q.shape or not len(p):
        raise ValueError(f"need two feature matrices of the same images, got {p.shape}/{q.shape}")
    return {
        "argmax_agreement": float((p.argmax(1) == q.argmax(1)).mean()),
        "max_probability_difference": float(np.abs(p - q).max()),
        "images": len(p),
    }


# --- serving a model trained on int8 features ------------------------------------------------------


def model_extractor(model: Any) -> Any:
    """The extractor network (`model.extractor_from`: every pooled output) of a logged
    pixels-to-probabilities model, from its own preprocessing and trunk (the source of truth)."""
    from leukemia.model import extractor_from

    pre, trunk = model.get_layer("preprocess"), model.get_layer("vgg16_trunk")
    return extractor_from(pre, trunk, int(model.input_shape[1]), name="extractor_float32")


def model_source(model: Any) -> str:
    """Identity of a logged model's trunk (what its int8 network is derived from): the weights of
    its preprocessing and trunk, and its input size."""
    import numpy as np

    digest = hashlib.sha256()
    for name in ("preprocess", "vgg16_trunk"):
        for weights in model.get_layer(name).get_weights():
            digest.update(np.ascontiguousarray(weights).tobytes())
    return f"model:{digest.hexdigest()[:16]}:{int(model.input_shape[1])}px"


def serving_int8(
    model: Any, calibration: Calibration | None, cache_root: str | Path
) -> Int8Extractor | None:
    """The int8 extractor a model whose heads trained on int8 features serves on: the int8 copy
    of its own trunk (`model_extractor`) with the run's calibration (deterministic, cached under
    `cache_root`); None, with one warning line saying why, where that cannot be had (it then
    serves on its float32 trunk, the run's int8 agreement metrics bounding the difference)."""
    reason = unavailable_reason()
    if reason is None and calibration is None:
        reason = "the run logged no calibration images"
    if reason is None:
        try:
            build = functools.partial(model_extractor, model)
            return derive_int8(build, model_source(model), calibration, cache_root)
        except Exception as exc:  # conversion, calibration or compilation: same fallback
            reason = f"cannot derive or compile the int8 network: {first_line(exc)}"
    log.warning("int8 backend unavailable (%s): serving on the model's float32 trunk", reason)
    return None
