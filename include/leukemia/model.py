"""The network: VGG16 transfer learning from raw pixels to the four class probabilities.

The full model is three parts, each a Keras model of its own so the pipeline can run them apart:

    raw RGB 0-255 → preprocess (overlay mask, then VGG16's caffe preprocessing, as fixed layers)
                  → trunk  (frozen VGG16 conv base, outputs block3/4/5_pool, called with training=False)
                  → pool   (the variant's global pooling + concatenation)
                  → head   (Normalization → Dense/Dropout … → softmax over CLASSES; or, for the
                            `linear` head, Normalization → L2-regularised softmax)

The trunk's pooled outputs never change for an image, so `features.py` caches them and training only
fits the head; `assemble` joins the parts into one model that takes raw pixels, which is what is logged.
`build_ensemble` joins one trunk to several heads (of either variant) and averages their softmax.
`build_tail` is the network above `block4_pool` (block 5, the pooling; or above `block3_pool`:
blocks 4-5): fine-tuning trains it on cached activations (`finetune.py`), then `assemble` takes the
trunk it updated.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from leukemia.config import BACKENDS, CLASSES, HEADS, RUN_DEFAULTS
from leukemia.errors import first_line
from leukemia.weights import (
    IMAGENET,
    NONE,
    WeightsUnavailable,
    resolve_weights,
)

log = logging.getLogger(__name__)

#: VGG16's caffe-style preprocessing: RGB → BGR, minus the ImageNet channel means (in BGR order).
VGG_MEAN_BGR = (103.939, 116.779, 123.68)
#: Pooled outputs every cache entry holds, in this order (one trunk pass serves every variant).
POOL_LAYERS = ("block3_pool", "block4_pool", "block5_pool")
POOL_WIDTHS = {"block3_pool": 256, "block4_pool": 512, "block5_pool": 512}
#: How much smaller than the input each pooled output is on a side (28, 14 and 7 at 224 px).
POOL_STRIDES = {"block3_pool": 8, "block4_pool": 16, "block5_pool": 32}
POOLED_KEYS = tuple(f"{layer}_{how}" for layer in POOL_LAYERS for how in ("gap", "gmp"))
#: The trunk output fine-tuning block 5 starts from (`build_extractor` with activations).
ACTIVATION_LAYER = "block4_pool"
#: Feature variants: which pooled outputs feed the head, concatenated in this order.
VARIANTS: dict[str, tuple[str, ...]] = {
    "seed": ("block5_pool_gmp",),  # the reference: block5 → GlobalMaxPooling2D, 512 values
    "multiscale": POOLED_KEYS,  # GAP and GMP of blocks 3, 4 and 5: 2,560 values
}
VGG16_CONV_PARAMS = 14_714_688
RANDOM_TRUNK_SEED = 1234

#: The scale-bar overlay of the public images lies inside the bottom-right square that starts at
#: row and column 192 of 224 (scaled to other input sizes) (32 x 32 px at 224): measured on the 2,279 dev images, the large
#: "200/500 px" box spans x 194-223, y 194-221, the small white box x 194-217, y 206-216 and the red
#: bar x 193-219, y 210-213. 192 is also a JPEG block (and 16-px chroma block) boundary, so the
#: compression halo of every style stays inside. A fixed square, not a detector: the mask is the same
#: for every image, so its footprint cannot tell the style (and with it the class) apart.
OVERLAY_START = 192
#: Fill colour of the masked square (RGB): the median colour of the 8-px ring around it on the dev
#: images, so the square looks like slide background. A constant: the square then carries nothing.
OVERLAY_FILL = (220.0, 229.0, 248.0)


@dataclass(frozen=True)
class ModelConfig:
    """What decides the network's shape and base weights."""

    input_size: int = RUN_DEFAULTS.input_size
    weights: str = "imagenet"  # "imagenet", a path to a VGG16 no-top .h5 file, or "none"
    variant: str = RUN_DEFAULTS.variant
    head_units: tuple[int, ...] = RUN_DEFAULTS.head_units
    dropout: float = RUN_DEFAULTS.dropout
    mask_overlay: bool = RUN_DEFAULTS.mask_overlay  # fill the overlay square (see OVERLAY_START)
    head: str = RUN_DEFAULTS.head  # "mlp" (head_units, dropout) or "linear" (l2)
    l2: float = RUN_DEFAULTS.l2
    #: the trunk the head's features come from (`backends.py`): asked for at extraction, the one
    #: used (`features.backend_of` the cache folder) in a run's logged configuration
    backend: str = RUN_DEFAULTS.backend

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"unknown feature variant {self.variant!r}: choose one of {', '.join(VARIANTS)}"
            )
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}: choose one of {', '.join(HEADS)}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}"
            )
        if self.input_size < 32:
            raise ValueError(
                f"input_size must be at least 32 (VGG16 pools 5 times), got {self.input_size}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def feature_width(variant: str) -> int:
    """Length of the variant's feature vector."""
    return sum(POOL_WIDTHS[key.rsplit("_", 1)[0]] for key in VARIANTS[variant])


def build_trunk(cfg: ModelConfig) -> Any:
    """The frozen VGG16 conv base with the block3/4/5 pool outputs, weights loaded and checked."""
    import keras

    value = resolve_weights(cfg.weights)  # a missing file or unreachable ImageNet: one clear line
    shape = (cfg.input_size, cfg.input_size, 3)
    if value not in (NONE, IMAGENET):
        base = keras.applications.VGG16(include_top=False, weights=None, input_shape=shape)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # keras warns per layer before it raises
                base.load_weights(value)
        except Exception as exc:
            expected = ", ".join(f"{w.path}{tuple(w.shape)}" for w in base.weights[:4])
            raise WeightsUnavailable(
                f"cannot load VGG16 weights from {value}: {first_line(exc)} Expected a VGG16 include_top=False "
                f"file with 26 arrays ({VGG16_CONV_PARAMS:,} parameters), e.g. {expected}, ..."
            ) from exc
    else:
        if value == NONE:
            # no weights (tests): a fixed random initialisation, so that the trunk that extracted the
            # cached features and the trunk inside the logged model are the same network
            keras.utils.set_random_seed(RANDOM_TRUNK_SEED)
        base = keras.applications.VGG16(
            include_top=False, weights=None if value == NONE else IMAGENET, input_shape=shape
        )
    base.trainable = False
    trunk = keras.Model(
        base.inputs, [base.get_layer(n).output for n in POOL_LAYERS], name="vgg16_trunk"
    )
    trunk.trainable = False
    return trunk


def overlay_start(size: int) -> int:
    """First row and column of the overlay square in a `size` x `size` input (192 at 224)."""
    return size * OVERLAY_START // 224


def overlay_mask_layers(inputs: Any, size: int) -> Any:
    """`inputs` with the overlay square filled with `OVERLAY_FILL`, from stock layers only.

    The image is cut into its top rows, the bottom-left block and the corner square; the square goes
    through a fixed Dense layer with a zero kernel, whose bias is the fill colour, and the pieces are
    joined again. Gradients and shapes pass unchanged, and the saved model loads in Keras' safe mode.
    """
    import keras
    import numpy as np

    start = overlay_start(size)
    rest = size - start
    top = keras.layers.Cropping2D(((0, rest), (0, 0)), name="overlay_top")(inputs)
    left = keras.layers.Cropping2D(((start, 0), (0, rest)), name="overlay_left")(inputs)
    corner = keras.layers.Cropping2D(((start, 0), (start, 0)), name="overlay_corner")(inputs)
    fill = keras.layers.Dense(3, name="overlay_fill", trainable=False)
    filled = fill(corner)
    fill.set_weights([np.zeros((3, 3), dtype="float32"), np.asarray(OVERLAY_FILL, dtype="float32")])
    bottom = keras.layers.Concatenate(axis=2, name="overlay_bottom")([left, filled])
    return keras.layers.Concatenate(axis=1, name="overlay_masked")([top, bottom])


def build_preprocess(input_size: int, mask_overlay: bool = False) -> Any:
    """`keras.applications.vgg16.preprocess_input` as a fixed Dense layer on the channel axis,
    after filling the overlay square when `mask_overlay` (the pipeline passes `cfg.mask_overlay`).

    Built from stock layers so the saved model loads anywhere without custom code; every use of the
    model (features, training, evaluation, prediction, scoring, Grad-CAM) sees the same pixels.
    """
    import keras
    import numpy as np

    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = overlay_mask_layers(inputs, input_size) if mask_overlay else inputs
    layer = keras.layers.Dense(3, name="vgg16_preprocess", trainable=False)
    outputs = layer(x)
    flip = np.eye(3, dtype="float32")[::-1]  # RGB → BGR
    layer.set_weights([flip, -np.asarray(VGG_MEAN_BGR, dtype="float32")])
    return keras.Model(inputs, outputs, name="preprocess")


def build_pool(input_size: int, variant: str) -> Any:
    """Pool the trunk's outputs the variant's way and concatenate (same op order as the cache)."""
    import keras

    sides = {n: input_size // POOL_STRIDES[n] for n in POOL_LAYERS}
    inputs = [keras.Input((sides[n], sides[n], POOL_WIDTHS[n]), name=n) for n in POOL_LAYERS]
    by_key: dict[str, Any] = {}
    for name, tensor in zip(POOL_LAYERS, inputs, strict=True):
        by_key[f"{name}_gap"] = keras.layers.GlobalAveragePooling2D(name=f"{name}_gap")(tensor)
        by_key[f"{name}_gmp"] = keras.layers.GlobalMaxPooling2D(name=f"{name}_gmp")(tensor)
    keys = VARIANTS[variant]
    out = (
        by_key[keys[0]]
        if len(keys) == 1
        else keras.layers.Concatenate(name="features")([by_key[k] for k in keys])
    )
    return keras.Model(inputs, out, name=f"pool_{variant}")


#: VGG16's blocks 4 and 5, in order: what fine-tuning from cached activations trains (the last
#: `blocks` of them, `tail_layers`).
TAIL_LAYERS = {
    "block4": ("block4_conv1", "block4_conv2", "block4_conv3", "block4_pool"),
    "block5": ("block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"),
}
#: The trunk output a tail of `blocks` trained blocks starts from.
TAIL_START = {1: ACTIVATION_LAYER, 2: "block3_pool"}


def tail_layers(blocks: int = 1) -> tuple[str, ...]:
    """The VGG16 layers a tail of the last `blocks` (1 or 2) conv blocks trains, in order."""
    if blocks not in TAIL_START:
        raise ValueError(f"a tail trains blocks 5 (1) or 4-5 (2), not {blocks} blocks")
    return tuple(n for block in list(TAIL_LAYERS)[-blocks:] for n in TAIL_LAYERS[block])


def tail_inputs(variant: str, blocks: int = 1) -> tuple[str, ...]:
    """The cached arrays a tail of `blocks` needs: its start layer (`TAIL_START`), and for block 5
    alone block 3's pooled outputs when the variant uses them (`features.ACTIVATION_KEYS`)."""
    tail_layers(blocks)
    if blocks == 2:
        return (TAIL_START[2],)
    return (ACTIVATION_LAYER, *(k for k in VARIANTS[variant] if k.startswith("block3_pool")))


def build_tail(cfg: ModelConfig, trunk: Any, precision: str = "float32", blocks: int = 1) -> Any:
    """The variant's features from cached activations: the last `blocks` conv blocks (1: block 5
    from `block4_pool`; 2: blocks 4-5 from `block3_pool`) as trainable copies of `trunk`'s layers
    and weights, then the variant's pooling and concatenation, in `build_pool`'s order. The same
    network as `trunk` → `build_pool` above its start layer: given an image's activations it gives
    the image's features.

    Inputs: a dict named by `tail_inputs(cfg.variant, blocks)`. `precision` "bfloat16" computes the
    blocks in mixed bfloat16 (float32 weights); the features are float32 either way.
    """
    import keras

    layers = tail_layers(blocks)
    start = TAIL_START[blocks]
    side = cfg.input_size // POOL_STRIDES[start]
    inputs = {start: keras.Input((side, side, POOL_WIDTHS[start]), name=start)}
    for key in tail_inputs(cfg.variant, blocks)[1:]:
        inputs[key] = keras.Input((POOL_WIDTHS["block3_pool"],), name=key)
    x = inputs[start]
    by_layer = {start: x}
    policy = policy_name(precision)
    for name in layers:
        frozen = trunk.get_layer(name)
        layer = frozen.__class__.from_config(
            {**frozen.get_config(), "dtype": policy, "trainable": True}
        )
        x = layer(x)
        layer.set_weights(frozen.get_weights())
        if name in POOL_LAYERS:
            by_layer[name] = x
    features = []
    for key in VARIANTS[cfg.variant]:
        name, how = key.rsplit("_", 1)
        if name not in by_layer:  # block 3's pooled outputs, cached beside block4_pool
            features.append(inputs[key])
            continue
        pool = (
            keras.layers.GlobalAveragePooling2D if how == "gap" else keras.layers.GlobalMaxPooling2D
        )
        features.append(pool(name=key)(keras.ops.cast(by_layer[name], "float32")))
    out = features[0] if len(features) == 1 else keras.layers.Concatenate(name="features")(features)
    return keras.Model(inputs, out, name=f"from_{start}_{cfg.variant}")


def adapted_normalization(x_train: Any, relative_floor: float = 1e-2) -> Any:
    """A Normalization layer adapted on the training features, robust to rarely active units.

    A unit that never fires on the training images (common for ReLU max-pooled features) has zero
    variance; plain standardisation would turn its first activation on a new image into a value of
    ~1e5 and saturate the softmax. Such units are switched off (huge variance: the head cannot have
    learned from them), and tiny variances are floored at a fraction of the median one.
    """
    import keras
    import numpy as np

    norm = keras.layers.Normalization(name="standardize")
    norm.adapt(x_train)
    variance = np.asarray(norm.adapt_variance, dtype="float64")
    live = variance > 1e-12
    floor = relative_floor * float(np.median(variance[live])) if live.any() else 1.0
    fixed = np.where(live, np.maximum(variance, floor), 1e12)
    norm.adapt_variance.assign(fixed.astype("float32"))
    norm.finalize_state()
    return norm


def build_head(cfg: ModelConfig, normalization: Any | None = None) -> Any:
    """Normalization → (Dense → Dropout)* → softmax; `normalization` is an adapted Normalization layer.

    The `linear` head is Normalization → softmax with an L2 penalty `cfg.l2` on its kernel: a
    multinomial logistic regression on the standardised features (its penalty is in `head.losses`).
    """
    import keras

    inputs = keras.Input((feature_width(cfg.variant),), name="features")
    x = normalization(inputs) if normalization is not None else inputs
    if cfg.head == "linear":
        outputs = keras.layers.Dense(
            len(CLASSES),
            activation="softmax",
            kernel_regularizer=keras.regularizers.L2(cfg.l2),
            name="probabilities",
        )(x)
        return keras.Model(inputs, outputs, name="head")
    for i, units in enumerate(cfg.head_units, 1):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
        x = keras.layers.Dropout(cfg.dropout, name=f"dropout_{i}")(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="head")


def assemble(cfg: ModelConfig, trunk: Any, head: Any, augment: Sequence[Any] = ()) -> Any:
    """One model from raw pixels (0-255) to class probabilities: preprocess → trunk → pool → head.

    `augment` (fine-tuning: stock random layers, identity at inference) goes after the preprocessing,
    so that a flip or rotation never moves the scale-bar overlay out of the masked square.
    """
    import keras

    inputs = keras.Input((cfg.input_size, cfg.input_size, 3), name="pixels")
    x = build_preprocess(cfg.input_size, cfg.mask_overlay)(inputs)
    for layer in augment:
        x = layer(x)
    pooled = trunk(x, training=False)
    features = build_pool(cfg.input_size, cfg.variant)(pooled)
    outputs = head(features, training=False)
    return keras.Model(inputs, outputs, name=f"leukemia_vgg16_{cfg.variant}")


def shared_trunk(models: Sequence[ModelConfig]) -> ModelConfig:
    """The configuration the members' trunk is built from; they must agree on what feeds the heads."""
    if not models:
        raise ValueError("an ensemble needs at least one member")

    def key(m: ModelConfig) -> tuple[Any, ...]:
        return (m.input_size, m.weights, m.mask_overlay, m.backend)

    differ = sorted({key(m) for m in models})
    if len(differ) > 1:
        raise ValueError(
            f"ensemble members differ in (input size, weights, overlay mask, backend): {differ}; "
            "one trunk serves only members trained on the same features"
        )
    return models[0]


def build_ensemble(cfg: ModelConfig, heads: Sequence[tuple[str, Any]]) -> Any:
    """One model from raw pixels to the mean of k heads' class probabilities, with one shared trunk.

    `heads` are (variant, head) pairs; `cfg` gives what they must share (input size, weights,
    overlay mask). Each variant's pooling is built once; stock layers only, so the saved model loads
    in Keras' safe mode. One head gives the single model that `assemble` builds.
    """
    import keras

    if not heads:
        raise ValueError("an ensemble needs at least one head")
    if len(heads) == 1:
        variant, head = heads[0]
        return assemble(replace(cfg, variant=variant), build_trunk(cfg), head)
    inputs = keras.Input((cfg.input_size, cfg.input_size, 3), name="pixels")
    x = build_preprocess(cfg.input_size, cfg.mask_overlay)(inputs)
    pooled = build_trunk(cfg)(x, training=False)
    pools = {v: build_pool(cfg.input_size, v)(pooled) for v in dict.fromkeys(v for v, _ in heads)}
    outputs = []
    for i, (variant, head) in enumerate(heads, 1):
        if head.input_shape[-1] != feature_width(variant):
            raise ValueError(
                f"head {i} takes {head.input_shape[-1]} features, not the {feature_width(variant)} "
                f"of variant {variant}: pair each head with the variant it was trained on"
            )
        single = (keras.tree.flatten(head.input)[0], keras.tree.flatten(head.output)[0])
        named = keras.Model(*single, name=f"head_{i}")  # unique nested names, one tensor out
        outputs.append(named(pools[variant], training=False))
    mean = keras.layers.Average(name="ensemble_mean")(outputs)
    return keras.Model(inputs, mean, name=f"leukemia_vgg16_ensemble{len(heads)}")


def build_model(cfg: ModelConfig) -> Any:
    """The full untrained network (frozen base, fresh head) for the given configuration."""
    import keras

    norm = keras.layers.Normalization(name="standardize")
    norm.build((None, feature_width(cfg.variant)))
    return assemble(cfg, build_trunk(cfg), build_head(cfg, norm))


def trainable_params(model: Any) -> int:
    """Number of trainable parameters (the head's)."""
    import numpy as np

    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def policy_name(precision: str) -> str:
    """Keras' dtype policy for a precision: mixed_bfloat16 (float32 weights) or float32."""
    return "mixed_bfloat16" if precision == "bfloat16" else "float32"


@contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Layers built in the block compute in `precision` (`policy_name`); the previous global
    policy comes back after it."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy_name(precision))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_extractor(
    cfg: ModelConfig,
    precision: str = "float32",
    activations: bool = False,
    layer: str = ACTIVATION_LAYER,
) -> Any:
    """preprocess → trunk → every pooled output, concatenated in `POOLED_KEYS` order (float32 out);
    with `activations`, a second output: `layer`'s (one of `POOL_LAYERS`, float32)."""
    with dtype_policy(precision):
        trunk = build_trunk(cfg)
        pre = build_preprocess(cfg.input_size, cfg.mask_overlay)
    return extractor_from(pre, trunk, cfg.input_size, activations, f"extractor_{precision}", layer)


def extractor_from(
    pre: Any,
    trunk: Any,
    size: int,
    activations: bool = False,
    name: str = "extractor",
    layer: str = ACTIVATION_LAYER,
) -> Any:
    """The extractor network (`build_extractor`) of a given preprocessing and trunk: those of a
    configuration, or a logged model's own (`backends.model_extractor`): the network `features.py`
    caches the outputs of; with `activations`, `layer`'s output second."""
    import keras

    inputs = keras.Input((size, size, 3), name="pixels")
    pooled = trunk(pre(inputs), training=False)
    pooled = [keras.ops.cast(t, "float32") for t in pooled]
    out = build_pool(size, "multiscale")(pooled)
    if activations:
        out = [out, pooled[POOL_LAYERS.index(layer)]]
    return keras.Model(inputs, out, name=name)
