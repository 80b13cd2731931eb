"""Grad-CAM explanations: where in the smear the model looked for its predicted class.

Grad-CAM (Selvaraju et al., 2017) weights each channel of the last convolution, VGG16's
`block5_conv3`, by the mean gradient of the class score (the logit before the softmax) and keeps
the positive part of the weighted sum. The logged model nests its parts (preprocess → vgg16_trunk →
pool_<variant> → head), so the conv activations are not one of its outputs: `GradCam` re-wires the
same layers and weights into a model with two outputs, the activations and the head's last hidden
layer (of an ensemble: its first, best-ranked head). For `multiscale` the block3/4 features do not
depend on block5_conv3; their contribution simply has no gradient there, and the map still shows
what block5 contributed.

Overlays use matplotlib's colormaps (no pyplot); images are written with Pillow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES

CAM_LAYER = "block5_conv3"
ALPHA = 0.45
COLORMAP = "jet"
#: A contact sheet shows at most this many overlays (the first ones); every overlay is still written.
SHEET_MAX = 48


def _part(model: Any, name: str) -> Any:
    try:
        return model.get_layer(name)
    except ValueError:
        names = ", ".join(layer.name for layer in model.layers)
        raise ValueError(
            f"model {model.name} has no layer {name!r} (it has {names}): Grad-CAM needs the pipeline's "
            "preprocess → vgg16_trunk → pool_<variant> → head model"
        ) from None


class GradCam:
    """Heatmaps of one loaded model; build once, call per batch of raw pixels."""

    def __init__(self, model: Any, layer: str = CAM_LAYER) -> None:
        import keras

        names = {layer_.name for layer_ in model.layers}
        # an ensemble (model.build_ensemble) is explained through its first, best-ranked head;
        # its own probabilities still give the class and the caption
        member = "head" not in names and "head_1" in names
        self.full = model if member else None
        head_name = "head_1" if member else "head"
        pre, trunk, head = (_part(model, n) for n in ("preprocess", "vgg16_trunk", head_name))
        pools = [layer_ for layer_ in model.layers if layer_.name.startswith("pool_")]
        if member:
            width = head.input_shape[-1]
            pools = [p for p in pools if p.output.shape[-1] == width]
        if len(pools) != 1:
            raise ValueError(
                f"model {model.name} needs exactly one pool_<variant> layer, found {len(pools)}"
            )
        # the last Dense (its input gives the logits): `probabilities` (Dense + softmax), or in a
        # calibrated head (`calibration.calibrated_head`) `logits`, then `temperature`, softmax
        calibrated = "temperature" in {layer_.name for layer_ in head.layers}
        self.last = _part(head, "logits" if calibrated else "probabilities")
        self.scale = float(head.get_layer("temperature").scale) if calibrated else 1.0
        trunk_cam = keras.Model(trunk.inputs, [_part(trunk, layer).output, *trunk.outputs])
        head_body = keras.Model(head.inputs, self.last.input)
        inputs = keras.Input(tuple(model.input_shape[1:]), name="pixels")
        conv, *pooled = trunk_cam(pre(inputs), training=False)
        hidden = head_body(pools[0](pooled), training=False)
        self.model = keras.Model(inputs, [conv, hidden], name="gradcam")
        self.size = int(model.input_shape[1])

    def __call__(self, pixels: Any, class_index: Sequence[int] | None = None) -> tuple[Any, Any]:
        """(heatmaps (n, S, S) in [0, 1], probabilities (n, 4)) for raw pixels (n, S, S, 3).

        The heatmap explains `class_index` (default: each image's predicted class).
        """
        import numpy as np
        import tensorflow as tf

        x = tf.convert_to_tensor(np.asarray(pixels, dtype="float32"))
        with tf.GradientTape() as tape:
            conv, hidden = self.model(x, training=False)
            logits = (tf.matmul(hidden, self.last.kernel) + self.last.bias) * self.scale
            probs = tf.nn.softmax(logits)
            if self.full is not None:  # an ensemble: its mean probabilities, not the member's
                probs = tf.stop_gradient(self.full(x, training=False))
            target = (
                tf.argmax(probs, axis=1)
                if class_index is None
                else tf.constant(class_index, "int64")
            )
            score = tf.gather(logits, target, axis=1, batch_dims=1)
        grads = tape.gradient(score, conv)
        weights = tf.reduce_mean(grads, axis=(1, 2))  # one weight per channel
        cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", conv, weights)).numpy()
        return np.stack([resize_heatmap(c, self.size) for c in cam]), probs.numpy()


def resize_heatmap(cam: Any, size: int | tuple[int, int]) -> Any:
    """A coarse (h, w) map resized bilinearly to `size` (side, or (height, width)) and scaled to
    [0, 1]; a flat map becomes all zeros."""
    import numpy as np
    from PIL import Image

    height, width = (size, size) if isinstance(size, int) else size
    cam = np.nan_to_num(np.asarray(cam, dtype="float32"))
    big = np.asarray(
        Image.fromarray(cam, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    )
    big = big - big.min()
    top = float(big.max())
    return (big / top if top > 0 else np.zeros_like(big)).astype("float32")


def overlay(image: Any, heatmap: Any, alpha: float = ALPHA, colormap: str = COLORMAP) -> Any:
    """The image (H, W, 3, 0-255) blended with the colour-mapped heatmap (H, W, 0-1): uint8 RGB."""
    import numpy as np
    from matplotlib import colormaps

    image = np.asarray(image, dtype="float32")
    heat = np.asarray(heatmap, dtype="float32")
    if heat.shape != image.shape[:2]:
        heat = resize_heatmap(heat, image.shape[:2])
    colours = colormaps[colormap](np.clip(heat, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype("uint8")


def caption(probabilities: Sequence[float]) -> str:
    """`pred: Pre (97%)`."""
    best = max(range(len(probabilities)), key=lambda i: probabilities[i])
    return f"pred: {CLASSES[best]} ({float(probabilities[best]):.0%})"


def _safe_stem(name: str) -> str:
    stem = Path(name.rstrip("/")).stem or "image"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80]


@dataclass
class Explainer:
    """Writes one overlay PNG per image as batches stream in, then a contact sheet of the first ones."""

    model: Any
    out_dir: Path
    colormap: str = COLORMAP
    written: list[Path] = field(default_factory=list, init=False)
    _sheet: list[tuple[Path, str]] = field(default_factory=list, init=False)
    _cam: GradCam | None = field(default=None, init=False)

    def add(self, pixels: Any, names: Sequence[str]) -> list[Path]:
        """Explain one batch (raw pixels aligned with `names`); return the overlay paths written."""
        from PIL import Image

        if len(names) == 0:
            return []
        if self._cam is None:
            self._cam = GradCam(self.model)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        heat, probs = self._cam(pixels)
        paths = []
        for image, h, p, name in zip(pixels, heat, probs, names, strict=True):
            path = self.out_dir / f"{len(self.written) + 1:05d}_{_safe_stem(name)}_gradcam.png"
            Image.fromarray(overlay(image, h, colormap=self.colormap)).save(path, compress_level=1)
            self.written.append(path)
            paths.append(path)
            if len(self._sheet) < SHEET_MAX:
                self._sheet.append((path, caption(p)))
        return paths

    def in_sheet(self, path: Path) -> bool:
        """True when `path` goes on the contact sheet (callers that upload overlays keep those)."""
        return any(p == path for p, _ in self._sheet)

    def finish(self, title: str = "Grad-CAM (block5_conv3)") -> Path | None:
        """The contact sheet `contact_sheet.png` (None when nothing was explained)."""
        from leukemia.plots import contact_sheet_png

        if not self._sheet:
            return None
        n = len(self.written)
        if n > len(self._sheet):
            title = f"{title}: first {len(self._sheet)} of {n} images"
        return contact_sheet_png(
            [p for p, _ in self._sheet],
            [c for _, c in self._sheet],
            self.out_dir / "contact_sheet.png",
            ncols=4,
            title=title,
        )


def explain(
    model: Any, pixels: Any, names: Sequence[str], out_dir: str | Path
) -> tuple[list[Path], Path | None]:
    """Overlays and a contact sheet for a few images at once: (overlay paths, contact sheet path)."""
    explainer = Explainer(model, Path(out_dir))
    explainer.add(pixels, names)
    return explainer.written, explainer.finish()
