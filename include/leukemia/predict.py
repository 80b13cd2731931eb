"""Prediction with a registered model: resolve and load it once, collect images, score them in batches.

The model is any `models:/`, `runs:/` or local MLflow URI of the pipeline's logged Keras model (raw
RGB pixels 0-255 in, the four class probabilities out); by default the `champion` alias of the
registered model. Inputs are image files, folders (searched recursively) and `s3://bucket/prefix`
URIs (read through the Airflow connection straight into memory). Scoring is a generator over
batches, so memory stays bounded however many images there are; an image that cannot be read or
decoded, or is over the byte or pixel cap (`images.ImageLimits`), is skipped with its reason and the
others are still scored.

Each prediction carries its calibrated confidence (the temperature is inside the registered model),
its conformal prediction set at the threshold the registered version carries (`calibration`), and
whether to refer it to a person: the set holds more than one class, or the batch came with an
external reason (e.g. drift) that refers every image in it.

The model is resolved and loaded through `registry` (fail-closed lookup, sha256-verified `.keras`
file, Keras safe mode). A model whose run trained on int8 features (`backend` int8) is served on
the int8 copy of its own trunk (`ServedInt8`, `backends.serving_int8`), so that its head sees the
numbers it was trained on; where int8 cannot run, on its float32 trunk, with one log line. Every
failure the user can fix (no champion yet, tracking server down, a
model that fails verification or has the wrong shape) is a `registry.ModelError` (`PredictionError`
for this module's own checks) whose message is one line saying what happened and what to do.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from leukemia.calibration import Calibration, no_class_likely, prediction_set, referral
from leukemia.calibration import set_label as join_classes
from leukemia.config import BENIGN, CLASSES, env, tracking_uri
from leukemia.errors import first_line
from leukemia.images import (
    IMAGE_SUFFIXES,
    ImageLimits,
    ImageRejected,
    decode_image,
    is_image_name,
    iter_folder,
)
from leukemia.registry import (
    ModelError,
    ModelRef,
    RegistryUnavailable,
    is_unreachable,
    load_keras,
    resolve_model,
)
from leukemia.watch import ood_reason

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
#: Threads that read and decode one batch's images while the previous batch is not yet needed.
READ_WORKERS = 8


class PredictionError(ModelError):
    """Something the user must fix before anything can be scored; the message is one line."""


# --- the model ----------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A loaded Keras model from pixels (n, S, S, 3) to the four class probabilities, with the
    calibration its registered version carries (None: no conformal threshold, sets of one class)."""

    ref: ModelRef
    model: Any
    input_size: int
    calibration: Calibration | None = None
    #: the drift watch's references (`watch.load_references`) and the two-output model that gives
    #: the pooled features with the probabilities (`watch.features_model`); None without them
    reference: Any = None
    background: Any = None
    features_model: Any = None
    #: the model served on the int8 copy of its trunk (`ServedInt8`) when its head was
    #: trained on int8 features; None: the Keras model itself
    int8: Any = None

    @property
    def version(self) -> str:
        return self.ref.label

    @property
    def threshold(self) -> float | None:
        """The conformal threshold of the prediction sets; None without calibration."""
        return self.calibration.threshold if self.calibration is not None else None


def model_heads(model: Any) -> list[tuple[str, Any]]:
    """(variant, head) of each head of a logged model: one (`model.assemble`) or k
    (`model.build_ensemble`), each variant told by the head's input width."""
    from leukemia.model import VARIANTS, feature_width

    by_width = {feature_width(v): v for v in VARIANTS}
    heads = [layer for layer in model.layers if re.fullmatch(r"head(_\d+)?", layer.name)]
    if not heads:
        raise ValueError(f"model {model.name} has no head layer: not a pipeline model")
    return [(by_width[int(h.input_shape[-1])], h) for h in heads]


class ServedInt8:
    """A logged model served on the int8 copy of its own trunk (`backends.serving_int8`): its
    heads (`model_heads`; their mean, for an ensemble) on the int8 network's features, as
    training fed them the int8 features."""

    def __init__(self, extractor: Any, heads: list[tuple[str, Any]]) -> None:
        self.extractor, self.heads = extractor, heads

    def predict(self, pixels: Any) -> tuple[Any, Any]:
        """Raw pixels → (the first head's input features, the class probabilities), float32."""
        import numpy as np

        from leukemia.features import select_variant

        cached = np.asarray(self.extractor.predict_on_batch(pixels), dtype="float32")
        features = {v: select_variant(cached, v) for v, _ in self.heads}
        probs = [np.asarray(h.predict_on_batch(features[v])) for v, h in self.heads]
        return features[self.heads[0][0]], np.mean(probs, axis=0, dtype="float32")


class ServedModel:
    """A `LoadedModel` as serving computes it, behind the Keras calls an evaluation makes
    (`input_shape`, `predict_on_batch`: pixels → probabilities): the int8 path when the model
    serves on it, else the Keras model. The gate measures this, so it measures what ships."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.input_shape = loaded.model.input_shape

    @classmethod
    def of(cls, ref: ModelRef) -> ServedModel:
        """Load a version for measuring it: verified (`registry.load_keras`, whose errors it
        raises as they are), on the trunk it serves on; no drift references or calibration."""
        keras_model = load_keras(ref)
        loaded = LoadedModel(ref, keras_model, int(keras_model.input_shape[1]))
        _attach_backend(loaded)
        return cls(loaded)

    def predict_on_batch(self, pixels: Any) -> Any:
        """The class probabilities of a batch of raw pixels."""
        if self.loaded.int8 is not None:
            return self.loaded.int8.predict(pixels)[1]
        return self.loaded.model.predict_on_batch(pixels)


def check_model_shape(model: Any, uri: str) -> int:
    """The input size S of a model that maps (n, S, S, 3) to (n, 4); PredictionError otherwise."""
    try:
        inputs, outputs = model.input_shape, model.output_shape
    except (AttributeError, ValueError) as exc:
        raise PredictionError(
            f"model {uri} has no single input and output: {first_line(exc)}"
        ) from None
    ok_in = (
        isinstance(inputs, tuple) and len(inputs) == 4 and inputs[3] == 3 and inputs[1] == inputs[2]
    )
    ok_in = ok_in and isinstance(inputs[1], int) and inputs[1] >= 32
    ok_out = isinstance(outputs, tuple) and len(outputs) == 2 and outputs[1] == len(CLASSES)
    if not (ok_in and ok_out):
        raise PredictionError(
            f"model {uri} maps {inputs} to {outputs}: expected square RGB images (None, S, S, 3) in "
            f"and {len(CLASSES)} class probabilities ({', '.join(CLASSES)}) out; pass a "
            "leukemia-classifier model URI"
        )
    return int(inputs[1])


def load_model(model: str | ModelRef | None = None) -> LoadedModel:
    """Resolve (if needed) and load the model once, verified (`registry.load_keras`); check its
    shape; attach its drift references and the trunk it serves on."""
    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    try:
        keras_model = load_keras(ref)
    except ModelError:
        raise
    except Exception as exc:
        if is_unreachable(exc):
            raise RegistryUnavailable(
                f"cannot reach MLflow at {tracking_uri()}: {first_line(exc)}"
            ) from None
        raise PredictionError(
            f"cannot load a Keras model from {ref.pinned_uri}: {first_line(exc)}"
        ) from None
    size = check_model_shape(keras_model, ref.uri)
    tags = version_tags(ref)
    calibration = Calibration.from_tags(tags)
    log.info("Loaded %s (input %dx%d)", ref.describe(), size, size)
    if calibration is None:
        log.warning(
            "%s has no conformal threshold: refer only for external reasons", ref.describe()
        )
    loaded = LoadedModel(ref=ref, model=keras_model, input_size=size, calibration=calibration)
    _attach_watch(loaded, tags)
    _attach_backend(loaded)
    return loaded


def source_run_id(ref: ModelRef) -> str | None:
    """The MLflow run a model was logged by: a registered version's, or a `runs:/` URI's; None
    for a model outside the tracking server."""
    from leukemia.registry import registered_version

    if ref.version:
        return str(registered_version(ref).run_id)
    if ref.uri.startswith("runs:/"):
        return ref.uri.removeprefix("runs:/").split("/", 1)[0]
    return None


def _attach_backend(loaded: LoadedModel) -> None:
    """Serve on the trunk the model's head was trained on: the int8 one when its run's logged
    configuration says int8 (`backends.serving_int8`, calibrated on the images the run logged);
    a Keras run's model, or a model outside the tracking server, serves as it is."""
    from leukemia import backends, tracking

    run_id = source_run_id(loaded.ref)
    if run_id is None:
        return
    try:
        tags = tracking.get_run(run_id).data.tags
    except Exception as exc:
        raise PredictionError(
            f"cannot read run {run_id} of {loaded.ref.describe()} (which trunk its head was "
            f"trained on): {first_line(exc)}"
        ) from None
    if json.loads(tags.get("config") or "{}").get("backend", backends.KERAS) != backends.INT8:
        return
    try:
        text = Path(tracking.download(run_id, backends.CALIBRATION_ARTIFACT)).read_text()
        calibration = backends.Calibration.from_json(text)
    except Exception as exc:  # an int8 run logged before its calibration was: the fallback says so
        log.info("Run %s has no readable %s: %s", run_id, backends.CALIBRATION_ARTIFACT, exc)
        calibration = None
    extractor = backends.serving_int8(loaded.model, calibration, backends.cache_root())
    if extractor is not None:
        loaded.int8 = ServedInt8(extractor, model_heads(loaded.model))


def version_tags(ref: ModelRef) -> dict[str, str]:
    """The tags of a registered version; {} for a model URI outside the registry."""
    from leukemia.registry import registered_version

    return dict(registered_version(ref).tags) if ref.version else {}


def _attach_watch(loaded: LoadedModel, tags: dict[str, str]) -> None:
    """The version's drift references and the two-output model, or one warning without them."""
    from leukemia.watch import features_model, load_references

    reference, background = load_references(tags)
    model = features_model(loaded.model, reference.width) if reference is not None else None
    if model is None:
        why = "keeps no drift reference" if reference is None else "has no pooling of its width"
        log.warning(
            "%s %s: scored without out-of-distribution flags or a drift decision",
            loaded.ref.describe(),
            why,
        )
        return
    loaded.reference, loaded.background, loaded.features_model = reference, background, model


# --- the inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """One image to score: the name shown to the user and how to read its bytes (read lazily)."""

    name: str
    read: Callable[[], bytes] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Skipped:
    """An input that was not scored, and why; `transient` failures (downloads) are worth retrying."""

    image: str
    reason: str
    transient: bool = False


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix` → (bucket, prefix)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an S3 URI: {uri!r}: expected s3://<bucket>/<prefix or key>")
    return parsed.netloc, parsed.path.lstrip("/")


def file_source(path: Path, limits: ImageLimits | None = None) -> ImageSource:
    """A local file as an image source; a file over the byte cap is rejected unread."""
    limits = limits or ImageLimits.from_env()

    def read() -> bytes:
        limits.check_bytes(path.stat().st_size)
        return path.read_bytes()

    return ImageSource(str(path), read)


def s3_source(client: Any, bucket: str, key: str, limits: ImageLimits | None = None) -> ImageSource:
    """An S3 object as an image source, downloaded into memory when read, up to the byte cap."""
    limits = limits or ImageLimits.from_env()

    def read() -> bytes:
        response = client.get_object(Bucket=bucket, Key=key)
        with response["Body"] as body:
            limits.check_bytes(int(response.get("ContentLength") or 0))
            data = body.read(limits.max_bytes + 1)
        limits.check_bytes(len(data))
        return data

    return ImageSource(f"s3://{bucket}/{key}", read)


def _s3_inputs(
    client: Any, uri: str, limits: ImageLimits
) -> tuple[list[ImageSource], list[Skipped]]:
    """The image objects under an `s3://bucket/prefix` URI; those over the byte cap are skipped."""
    from leukemia.storage import list_objects

    bucket, prefix = split_s3_uri(uri)
    try:
        sizes = {o["Key"]: int(o["Size"]) for o in list_objects(client, bucket, prefix)}
    except Exception as exc:
        return [], [Skipped(uri, f"cannot list {uri}: {first_line(exc)}", transient=True)]
    keys = list(sizes)
    if prefix and prefix in sizes:  # one object named exactly
        keys = [prefix]
    elif prefix and not prefix.endswith("/"):  # a folder: never match `incoming2/`
        keys = [k for k in keys if k.startswith(prefix + "/")]
    images = [k for k in keys if is_image_name(k) and not k.endswith("/")]
    if not images:
        return [], [Skipped(uri, f"no images under {uri} (expected {', '.join(IMAGE_SUFFIXES)})")]
    sources, skipped = [], []
    for key in images:
        try:
            limits.check_bytes(sizes[key])
        except ImageRejected as exc:
            skipped.append(Skipped(f"s3://{bucket}/{key}", str(exc)))
            continue
        sources.append(s3_source(client, bucket, key, limits))
    return sources, skipped


def collect_inputs(
    specs: Sequence[str | Path],
    conn_id: str | None = None,
    client: Any | None = None,
    limits: ImageLimits | None = None,
) -> tuple[list[ImageSource], list[Skipped]]:
    """Image sources for files, folders (recursive) and `s3://bucket/prefix` URIs, in the given order.

    Paths that do not exist, folders without images, S3 prefixes that cannot be listed or hold
    no images, and objects over the byte cap come back as skipped, with the reason. No image is
    read yet.
    """
    limits = limits or ImageLimits.from_env()
    sources: list[ImageSource] = []
    skipped: list[Skipped] = []
    for spec in specs:
        text = str(spec)
        if text.startswith("s3://"):
            if client is None:
                from leukemia.storage import s3_client

                client = s3_client(conn_id or env("LEUKEMIA_AWS_CONN_ID"))
            more, why = _s3_inputs(client, text, limits)
            sources.extend(more)
            skipped.extend(why)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            found = [file_source(p, limits) for p in iter_folder(path)]
            if not found:
                skipped.append(
                    Skipped(text, f"no images in folder (expected {', '.join(IMAGE_SUFFIXES)})")
                )
            sources.extend(found)
        elif path.is_file():
            sources.append(replace(file_source(path, limits), name=text))
        else:
            skipped.append(Skipped(text, "no such file or folder"))
    return sources, skipped


# --- scoring ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One image's result: the class, its probabilities, the prediction set and the referral.

    `prediction_set` defaults to the predicted class alone; `overlay` names the image's Grad-CAM
    overlay (an object key or a path) when one was written.
    """

    image: str
    label: str
    probabilities: tuple[float, ...]
    model_version: str
    prediction_set: tuple[str, ...] = ()
    refer: bool = False
    refer_reason: str = ""
    overlay: str = ""
    ood_score: float | None = None  # distance to the training features (None: no reference)

    def __post_init__(self) -> None:
        if not self.prediction_set:
            object.__setattr__(self, "prediction_set", (self.label,))

    @property
    def malignant(self) -> bool:
        """Early, Pre and Pro are malignant (the predicted class decides, as in the evaluation)."""
        return self.label != BENIGN

    @property
    def call(self) -> str:
        return "malignant" if self.malignant else "benign"

    @property
    def confidence(self) -> float:
        """The top class probability (calibrated when the model carries a temperature)."""
        return max(self.probabilities)

    def referred_for(self, reason: str) -> Prediction:
        """This prediction referred for one more (external) reason, e.g. a drifted batch."""
        reasons = "; ".join(r for r in (self.refer_reason, reason) if r)
        return replace(self, refer=True, refer_reason=reasons)

    @property
    def set_label(self) -> str:
        """The prediction set as one string: `Pre|Pro`."""
        return join_classes(self.prediction_set)

    def as_dict(self) -> dict[str, Any]:
        """JSON form: class, probabilities by class name, the benign/malignant call, model version,
        the prediction set (a list), the referral and the Grad-CAM overlay ("" when none)."""
        return {
            "image": self.image,
            "class": self.label,
            "confidence": self.confidence,
            "probabilities": dict(zip(CLASSES, self.probabilities, strict=True)),
            "malignant": self.malignant,
            "call": self.call,
            "model_version": self.model_version,
            "prediction_set": list(self.prediction_set),
            "refer": self.refer,
            "refer_reason": self.refer_reason,
            "overlay": self.overlay,
            "ood_score": self.ood_score,
        }

    def as_row(self) -> dict[str, Any]:
        """Flat form for CSV and tables: one column per class probability; the columns added with
        the prediction sets come after the older ones, so positional readers keep working."""
        return {
            "image": self.image,
            "class": self.label,
            **dict(zip(CLASSES, self.probabilities, strict=True)),
            "malignant": "true" if self.malignant else "false",
            "model_version": self.model_version,
            "confidence": self.confidence,
            "prediction_set": self.set_label,
            "refer": "true" if self.refer else "false",
            "refer_reason": self.refer_reason,
            "overlay": self.overlay,
            "ood_score": "" if self.ood_score is None else round(self.ood_score, 3),
        }


def make_prediction(
    image: str,
    probabilities: Sequence[float],
    model_version: str,
    threshold: float | None,
    external_reasons: Sequence[str] = (),
    ood_score: float | None = None,
) -> Prediction:
    """A prediction with its set at `threshold` and its referral (`calibration.referral`)."""
    probs = tuple(float(v) for v in probabilities)
    classes = prediction_set(probs, threshold)
    refer, reason = referral(classes, external_reasons, no_class_likely(probs, threshold))
    top = max(range(len(CLASSES)), key=lambda k: probs[k])
    return Prediction(
        image, CLASSES[top], probs, model_version, classes, refer, reason, ood_score=ood_score
    )


@dataclass
class Batch:
    """One scored batch: predictions (with the pixels the model saw, aligned) and skipped inputs."""

    predictions: list[Prediction]
    skipped: list[Skipped]
    pixels: Any  # float32 (len(predictions), S, S, 3)
    scored_at: str = ""
    features: Any = None  # float32 (len(predictions), width): the head's input (with a reference)
    ood_flagged: int = 0  # predictions referred as out of distribution


def _load(source: ImageSource, size: int, limits: ImageLimits) -> Any:
    """Pixels of one source, or a Skipped with the reason."""
    try:
        data = source.read()
    except ImageRejected as exc:  # over the byte cap
        return Skipped(source.name, str(exc))
    except Exception as exc:
        return Skipped(
            source.name, f"cannot read: {first_line(exc)}", transient=not isinstance(exc, OSError)
        )
    try:
        return decode_image(data, size, limits)
    except ImageRejected as exc:
        return Skipped(source.name, str(exc))
    except Exception as exc:  # anything Pillow raises on odd files
        return Skipped(source.name, f"cannot decode: {first_line(exc)}")


def _chunks(items: Iterable[ImageSource], n: int) -> Iterator[list[ImageSource]]:
    chunk: list[ImageSource] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_batches(
    model: LoadedModel,
    sources: Iterable[ImageSource],
    batch_size: int = DEFAULT_BATCH_SIZE,
    limits: ImageLimits | None = None,
    external_reasons: Sequence[str] = (),
) -> Iterator[Batch]:
    """Score `sources` `batch_size` at a time: only one batch of images is held in memory.

    Each batch's images are read and decoded by a few threads (S3 round trips overlap), then scored
    by one `predict_on_batch`; predictions keep the input order. Images over the pixel cap of
    `limits` (default: the settings) are skipped before they are decoded. Each prediction's set
    uses the model's conformal threshold; `external_reasons` (e.g. a drifted batch) refer every
    image.
    """
    import numpy as np

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    size = model.input_size
    limits = limits or ImageLimits.from_env()
    with ThreadPoolExecutor(max_workers=min(READ_WORKERS, batch_size)) as pool:
        for chunk in _chunks(sources, batch_size):
            loaded = list(pool.map(lambda s: _load(s, size, limits), chunk))
            good = [
                (s, x) for s, x in zip(chunk, loaded, strict=True) if not isinstance(x, Skipped)
            ]
            skipped = [x for x in loaded if isinstance(x, Skipped)]
            for item in skipped:
                log.info("Skipped %s: %s", item.image, item.reason)
            pixels = (
                np.stack([x for _, x in good]) if good else np.zeros((0, size, size, 3), "float32")
            )
            probs, features, scores = _forward(model, pixels)
            reasons = [list(external_reasons) for _ in good]
            flagged = 0
            if scores is not None:
                for i, score in enumerate(scores):
                    if score > model.reference.threshold:
                        reasons[i].append(ood_reason(float(score), model.reference.threshold))
                        flagged += 1
            predictions = [
                make_prediction(
                    s.name,
                    p,
                    model.version,
                    model.threshold,
                    reasons[i],
                    None if scores is None else float(scores[i]),
                )
                for i, ((s, _), p) in enumerate(zip(good, probs, strict=True))
            ]
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            yield Batch(predictions, skipped, pixels, stamp, features, flagged)


def _forward(model: LoadedModel, pixels: Any) -> tuple[Any, Any, Any]:
    """Probabilities, pooled features and OOD scores of a batch (one forward pass; features and
    scores None when the model keeps no drift reference)."""
    import numpy as np

    from leukemia.drift import ood_scores

    if not len(pixels):
        return np.zeros((0, len(CLASSES)), "float32"), None, None
    if model.int8 is not None:
        features, probs = model.int8.predict(pixels)
        if model.features_model is None:
            return probs, None, None
    elif model.features_model is None:
        return np.asarray(model.model.predict_on_batch(pixels), dtype="float32"), None, None
    else:
        features, probs = model.features_model.predict_on_batch(pixels)
    features = np.asarray(features, dtype="float32")
    scores = ood_scores(model.reference, features)
    return np.asarray(probs, dtype="float32"), features, scores


def predict(
    inputs: Sequence[str | Path],
    model_uri: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    conn_id: str | None = None,
    external_reasons: Sequence[str] = (),
) -> tuple[list[Prediction], list[Skipped]]:
    """Everything at once (for small sets and notebooks): predictions and skipped inputs;
    `external_reasons` refer every image."""
    loaded = load_model(model_uri)
    sources, skipped = collect_inputs(inputs, conn_id)
    predictions: list[Prediction] = []
    for batch in iter_batches(loaded, sources, batch_size, external_reasons=external_reasons):
        predictions.extend(batch.predictions)
        skipped.extend(batch.skipped)
    return predictions, skipped
