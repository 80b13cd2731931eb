"""Cached base features: one frozen-VGG16 pass per image, reused by every grid configuration.

The cache is a folder (a local path, or in the DAG `<work store>/features/`) with one sub-folder per
key (weights identity, input size, precision, overlay mask). It holds *shard files* `part-<hash>.npz`, each written
whole by one extraction shard: the sha256 of its images and one array per pooled output of
`model.POOLED_KEYS`, so every feature variant comes out of the same single pass. A later run, or a
retried shard, computes only images that no shard file holds yet; a reader fetches only the arrays
its variant needs (ranged reads on S3).

With `augment_copies` n, the train and val images also get n augmented copies (`augment.py`: stain
jitter, background patches from other images, lighting), extracted by the same shards and cached in
the sub-folders `augmented-<version>-<copy>/` of the same cache folder, keyed by the original
image's sha256 (`augmented_dir`, `load_copies`).

With `activations`, the same pass also keeps what fine-tuning VGG16's block 5 needs
(`finetune.py`, source `activations`): each image's `block4_pool` output (14 x 14 x 512 at 224 px)
as float16, beside its block-3 pooled outputs, in shard files of the sub-folder
`activations_dir(<cache folder>)` (of the originals and of each augmented copy's folder), so that
they are keyed like the features (weights, input size, precision, overlay mask, augmentation
version). About 200 KB an image at 224 px, 25 times its features (`load_activations`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import re
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from leukemia.augment import AUGMENT_VERSION
from leukemia.config import CLASSES, PRECISIONS
from leukemia.images import load_images
from leukemia.model import (
    ACTIVATION_LAYER,
    POOL_WIDTHS,
    POOLED_KEYS,
    VARIANTS,
    ModelConfig,
    build_extractor,
)
from leukemia.objectstore import Store, join, open_store
from leukemia.weights import weights_identity

log = logging.getLogger(__name__)

#: Most bytes of decoded images an extraction keeps for its augmented copies (`PixelMemo`): 3,500
#: images of 224 px; a shard of more reads the rest again.
MEMO_BYTES = 512 * 2**20
#: Images per extraction shard when the run does not say (`extract_shards` 0), and per shard file.
IMAGES_PER_SHARD = 500
#: Most extraction shards the automatic count makes (more workers than this rarely pay off).
MAX_SHARDS = 64
#: The array of a shard file that names its images, row by row.
SHA_KEY = "sha256"
PART_PREFIX, PART_SUFFIX = "part-", ".npz"
#: The trunk output cached for fine-tuning block 5 (`model.ACTIVATION_LAYER`), the sub-folder it
#: goes in (named after it), its stored dtype.
ACTIVATION_DTYPE = "float16"
#: The arrays of an activation shard file: block 5's input, and block 3's pooled outputs (the
#: `multiscale` features that do not depend on block 4 or 5).
ACTIVATION_KEYS = (ACTIVATION_LAYER, "block3_pool_gap", "block3_pool_gmp")
#: An int8 network's key in a cache folder's name (`backends.int8_key`).
KEY_PATTERN = "[0-9a-f]{16}"


def _offsets() -> dict[str, tuple[int, int]]:
    """Column range of each pooled output inside a cache row."""
    out, start = {}, 0
    for key in POOLED_KEYS:
        width = POOL_WIDTHS[key.rsplit("_", 1)[0]]
        out[key] = (start, start + width)
        start += width
    return out


_OFFSETS = _offsets()
CACHE_WIDTH = max(end for _, end in _OFFSETS.values())  # 2,560 floats per image


#: oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below AVX-512 BF16: under one, oneDNN has no bfloat16 path.
NO_BF16_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
)


def cpu_bf16() -> bool:
    """True where oneDNN runs bfloat16 on this CPU: AVX-512 BF16 or AMX in /proc/cpuinfo, and no
    ONEDNN_MAX_CPU_ISA cap below them."""
    import os

    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in NO_BF16_ISAS:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported() -> bool:
    """True where bfloat16 matmuls are fast: a GPU, or a CPU with AVX-512 BF16 / AMX."""
    if cpu_bf16():
        return True
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_precision(precision: str) -> str:
    """'auto' → 'bfloat16' where supported, else 'float32'; an explicit 'bfloat16' where it is
    not is refused (oneDNN aborts the process on a CPU without AVX-512 BF16)."""
    if precision == "auto":
        return "bfloat16" if bf16_supported() else "float32"
    if precision not in PRECISIONS:
        choices = f"{', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}"
        raise ValueError(f"precision must be {choices}, got {precision!r}")
    if precision == "bfloat16" and not bf16_supported():
        raise ValueError(
            "precision bfloat16 needs a GPU or a CPU with AVX-512 BF16 (or AMX), and this machine "
            "has neither (or ONEDNN_MAX_CPU_ISA caps it below them): choose float32, or auto "
            "(bfloat16 only where it runs)"
        )
    return precision


def cache_dir_for(root: str | Path, cfg: ModelConfig, precision: str, int8: str = "") -> str:
    """The cache folder (path or URI) for one (weights, input size, precision, overlay mask); with
    `int8` (an int8 network's key, `backends.features_key`), the folder of that int8 network's
    features, precision aside (`<weights>-<size>px-int8-<key>[-masked]`).

    Unmasked features keep the folder name they had before the mask existed, Keras ones the name
    they had before the int8 backend existed.
    """
    masked = "-masked" if cfg.mask_overlay else ""
    trunk = f"int8-{int8}" if int8 else precision
    return join(root, f"{weights_identity(cfg.weights)}-{cfg.input_size}px-{trunk}{masked}")


def backend_of(cache_dir: str | Path) -> str:
    """The backend whose features a cache folder (`cache_dir_for`) holds: `int8` or `keras`."""
    name = str(cache_dir).rstrip("/").rpartition("/")[2]
    return "int8" if re.search(rf"-int8-{KEY_PATTERN}(-masked)?$", name) else "keras"


def reference_dir(cache_dir: str | Path, cfg: ModelConfig) -> str:
    """The float32 Keras cache folder beside an int8 one: where the features an int8 run is
    compared with (`reference` of `extract_features`) are cached."""
    return cache_dir_for(cache_key(cache_dir, cfg).root, cfg, "float32")


def augmented_dir(cache_dir: str | Path, copy: int) -> str:
    """Where augmented copy number `copy` of the images of a cache folder is cached."""
    return join(cache_dir, f"augmented-{AUGMENT_VERSION}-{copy}")


def activations_dir(cache_dir: str | Path) -> str:
    """Where the block-4 activations of the images of a feature cache folder (`cache_dir_for`, or
    one of its `augmented_dir`s) are cached: a sub-folder, so that they share its key."""
    return join(cache_dir, ACTIVATION_LAYER)


class CacheKey(NamedTuple):
    """What `cache_dir_for` made a cache folder from: its root, the precision, and the int8
    network's key ("" for Keras features; their precision is then "float32", the float parts')."""

    root: str
    precision: str
    int8: str = ""

    @property
    def backend(self) -> str:
        return "int8" if self.int8 else "keras"


def cache_key(cache_dir: str | Path, cfg: ModelConfig) -> CacheKey:
    """The `CacheKey` of `cache_dir`, checked against the configuration's weights, input size and
    overlay mask (another configuration's folder raises)."""
    root, _, name = str(cache_dir).rstrip("/").rpartition("/")
    named = {Path(cache_dir_for("cache", cfg, p)).name: p for p in PRECISIONS[1:]}
    if name in named:
        return CacheKey(root, named[name])
    int8 = Path(cache_dir_for("cache", cfg, "float32", "<key>")).name
    prefix, _, suffix = int8.partition("<key>")
    key = name[len(prefix) : len(name) - len(suffix)]
    if not (name.startswith(prefix) and name.endswith(suffix) and re.fullmatch(KEY_PATTERN, key)):
        raise ValueError(
            f"{cache_dir} is not a feature cache of weights {cfg.weights}, {cfg.input_size} px, "
            f"overlay mask {cfg.mask_overlay}: expected a folder named one of {', '.join(named)} "
            f"or {int8}"
        )
    return CacheKey(root, "float32", key)


def shard_count(images: int, requested: int = 0) -> int:
    """Extraction shards for `images` images: `requested`, or one per `IMAGES_PER_SHARD` (capped)."""
    if requested < 0:
        raise ValueError(f"extract_shards must be 0 (automatic) or more, got {requested}")
    if requested:
        return max(1, min(requested, images))
    return max(1, min(MAX_SHARDS, math.ceil(images / IMAGES_PER_SHARD)))


def shard_of(shas: Sequence[str], shard: int, shards: int) -> list[str]:
    """Shard `shard` of `shards`: a contiguous slice of the sorted distinct sha256s (sizes differ by
    at most one)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, {shards}), got {shard}")
    unique = sorted(set(shas))
    return unique[len(unique) * shard // shards : len(unique) * (shard + 1) // shards]


def iter_image_batches(paths: Sequence[str | Path], size: int, batch_size: int) -> Iterator[Any]:
    """`load_images` batch by batch, the next batch fetched while the caller works on this one."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load_images, chunks[0], size)
        for i in range(len(chunks)):
            batch = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(load_images, chunks[i + 1], size)
            yield batch


def part_name(shas: Sequence[str]) -> str:
    """A shard file's name, from its images: a retried shard writes the same object again."""
    return (
        f"{PART_PREFIX}{hashlib.sha256(chr(10).join(shas).encode()).hexdigest()[:16]}{PART_SUFFIX}"
    )


def write_arrays(store: Store, shas: Sequence[str], arrays: dict[str, Any]) -> str:
    """One shard file: the images' sha256 and the named arrays (a row per image); its name."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **{SHA_KEY: np.asarray(shas, dtype="S64")}, **arrays)
    name = part_name(shas)
    store.write_bytes(name, buffer.getvalue())
    return name


def write_part(store: Store, shas: Sequence[str], rows: Any) -> str:
    """One shard file: the images' sha256 and one array per pooled output; returns its name."""
    return write_arrays(store, shas, {key: rows[:, slice(*_OFFSETS[key])] for key in POOLED_KEYS})


def write_activations(store: Store, shas: Sequence[str], activations: Any, rows: Any) -> str:
    """One activation shard file (`ACTIVATION_KEYS`): the images' `ACTIVATION_LAYER` outputs as
    `ACTIVATION_DTYPE` and their block-3 pooled features from `rows`; its name. Refuses values
    that float16 cannot hold (they would train block 5 on infinities)."""
    import numpy as np

    compact = np.asarray(activations).astype(ACTIVATION_DTYPE, copy=False)
    if not np.isfinite(compact).all():
        raise ValueError(
            f"{ACTIVATION_LAYER} outputs exceed the {ACTIVATION_DTYPE} range (±65,504) in "
            f"{int((~np.isfinite(compact)).sum())} values: these weights need a wider cache dtype"
        )
    arrays = {key: rows[:, slice(*_OFFSETS[key])] for key in ACTIVATION_KEYS[1:]}
    return write_arrays(store, shas, {ACTIVATION_LAYER: compact, **arrays})


#: CPython 3.11's `ast` is not thread-safe (python/cpython#106905): parsing in two threads at once
#: can raise "SystemError: AST constructor recursion depth mismatch" (seen in `cache_index`'s
#: pool). The reads run in parallel, the parsing of the bytes read does not.
_PARSE_LOCK = threading.Lock()


def read_arrays(
    store: Store, name: str, keys: Sequence[str], size: int | None = None
) -> dict[str, Any]:
    """Only the named arrays of one shard file (each one ranged read on S3, not the whole file)."""
    import numpy as np

    with store.open(name, size) as fh, zipfile.ZipFile(fh) as archive:
        raw = {key: archive.read(f"{key}.npy") for key in keys}
    with _PARSE_LOCK:  # numpy parses each header with ast.literal_eval: one thread at a time
        return {key: np.lib.format.read_array(io.BytesIO(data)) for key, data in raw.items()}


def _parts(store: Store) -> dict[str, int]:
    """Name → size of the shard files of one cache folder."""
    return {
        name: size
        for name, size in store.list().items()
        if "/" not in name and name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)
    }


def cache_index(store: Store, workers: int = 16) -> dict[str, tuple[str, int]]:
    """sha256 → (shard file, row) of every image cached in one cache folder.

    Reads the sha256 array of each shard file only (a few KB each); the first file holding an
    image wins, so the answer does not depend on listing order.
    """
    parts = _parts(store)
    if not parts:
        return {}

    def shas(item: tuple[str, int]) -> tuple[str, list[str]]:
        found = read_arrays(store, item[0], [SHA_KEY], item[1])[SHA_KEY]
        return item[0], [s.decode() for s in found]

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(parts)))) as pool:
        listed = sorted(pool.map(shas, parts.items()))
    index: dict[str, tuple[str, int]] = {}
    for name, names in listed:
        for row, sha in enumerate(names):
            index.setdefault(sha, (name, row))
    return index


@dataclass
class ExtractResult:
    """Where the features are and how much work it took (small: fits in XCom)."""

    cache_dir: str
    images: int
    computed: int
    cached: int
    seconds: float
    images_per_s: float
    precision: str
    shard: int = 0
    shards: int = 1
    parts_written: int = 0
    copies: int = 0  # augmented copies of each train and val image
    augmented: int = 0  # augmented rows computed by this call
    activations: bool = False  # block-4 activations cached too (`activations_dir`)
    backend: str = "keras"  # the trunk the features came from (int8 asked may fall back to keras)
    reference: int = (
        0  # images whose float32 Keras features an int8 shard keeps beside (`reference`)
    )


class PixelMemo:
    """Decoded images kept (uint8, lossless: decoding gives whole values) for the passes after the
    first, so that an augmented copy does not read and decode its image again; at most `limit`
    bytes, beyond which images are read again."""

    def __init__(self, wanted: set[str], limit: int | None = None) -> None:
        self.wanted, self.pixels, self.bytes = wanted, {}, 0
        self.limit = MEMO_BYTES if limit is None else limit

    def keep(self, shas: Sequence[str], batch: Any) -> None:
        for sha, image in zip(shas, batch, strict=True):
            if sha in self.wanted and sha not in self.pixels and self.bytes < self.limit:
                self.pixels[sha] = image.astype("uint8")
                self.bytes += self.pixels[sha].nbytes

    def batches(
        self, shas: Sequence[str], source: dict[str, str | Path], size: int, batch_size: int
    ) -> Iterator[Any]:
        """`iter_image_batches` of `shas`, the kept images from memory."""
        import numpy as np

        if not all(s in self.pixels for s in shas):
            yield from iter_image_batches([source[s] for s in shas], size, batch_size)
            return
        for first in range(0, len(shas), batch_size):
            chunk = shas[first : first + batch_size]
            yield np.stack([self.pixels[s] for s in chunk]).astype("float32")


@dataclass
class Pending:
    """What one cache folder (the originals', or one augmented copy's) still lacks: the images
    without features and, when activations are asked for, those without activations."""

    store: Store
    features: list[str]
    activations: list[str] | None = None  # None: not asked for
    activation_store: Store | None = None

    @property
    def todo(self) -> list[str]:
        """The images a pass computes: those that lack either, sorted."""
        return sorted({*self.features, *(self.activations or ())})

    def write(self, part: Sequence[str], rows: Any, acts: Any) -> int:
        """Write what this folder lacks of `part`'s computed rows and activations; files written."""
        written = 0
        wanted = set(self.features)
        keep = [i for i, sha in enumerate(part) if sha in wanted]
        if keep:
            write_part(self.store, [part[i] for i in keep], rows[keep])
            written += 1
        wanted = set(self.activations or ())
        keep = [i for i, sha in enumerate(part) if sha in wanted]
        if keep and self.activation_store is not None:
            shas = [part[i] for i in keep]
            write_activations(self.activation_store, shas, acts[keep], rows[keep])
            written += 1
        return written


def _lacking(folder: str, shas: Sequence[str], activations: bool) -> Pending:
    """`Pending` of one cache folder for `shas` (one listing of it, and of its activations)."""
    store = open_store(folder)
    done = cache_index(store)
    pending = Pending(store, [sha for sha in shas if sha not in done])
    if activations:
        pending.activation_store = open_store(activations_dir(folder))
        have = cache_index(pending.activation_store)
        pending.activations = [sha for sha in shas if sha not in have]
    return pending


def compute_part(
    part: Sequence[str],
    source: dict[str, str | Path],
    extractor: Any,
    size: int,
    batch_size: int,
    transform: Any = None,
    memo: PixelMemo | None = None,
) -> tuple[Any, Any]:
    """The feature rows (and, for an extractor with two outputs, the `ACTIVATION_DTYPE`
    activations) of `part`'s images, `transform(pixels, shas)` applied to each batch first."""
    import numpy as np

    rows, acts = np.empty((len(part), CACHE_WIDTH), dtype="float32"), None
    if memo is None:
        batches = iter_image_batches([source[s] for s in part], size, batch_size)
    else:
        batches = memo.batches(part, source, size, batch_size)
    for i, batch in enumerate(batches):
        start = i * batch_size
        shas = part[start : start + len(batch)]
        if memo is not None:
            memo.keep(shas, batch)
        if transform is not None:
            batch = transform(batch, shas)
        out = extractor.predict_on_batch(batch)
        if isinstance(out, (list, tuple)):
            out, block = out
            if acts is None:
                acts = np.empty((len(part), *block.shape[1:]), dtype=ACTIVATION_DTYPE)
            acts[start : start + len(batch)] = np.asarray(block)
        rows[start : start + len(batch)] = np.asarray(out, dtype="float32")
    return rows, acts


def _extract_into(pending: Pending, compute: Callable[[Sequence[str]], tuple[Any, Any]]) -> int:
    """Compute what one cache folder lacks (`pending.todo`), `IMAGES_PER_SHARD` images at a time
    (`compute(shas)`: `compute_part` with the pass's extractor, transform and memo), each written as the
    shard files it lacks (`Pending.write`); returns the files written."""
    todo = pending.todo
    started, written = time.monotonic(), 0
    for first in range(0, len(todo), IMAGES_PER_SHARD):
        part = todo[first : first + IMAGES_PER_SHARD]
        rows, acts = compute(part)
        written += pending.write(part, rows, acts)
        done = first + len(part)
        log.info(
            "Extracted %d/%d images (%.1f images/s)",
            done,
            len(todo),
            done / max(time.monotonic() - started, 1e-9),
        )
    return written


def _pending(
    cache: str, mine: Sequence[str], augmented: Sequence[str], copies: int, activations: bool
) -> tuple[Pending, list[Pending]]:
    """What a cache folder lacks of the shard's images, and each augmented copy's folder of its
    train and val images."""
    originals = _lacking(cache, mine, activations)
    return originals, [
        _lacking(augmented_dir(cache, c), augmented, activations) for c in range(copies)
    ]


def _log_todo(
    shard: str,
    images: int,
    cache: str,
    originals: Pending,
    copy_todo: Sequence[Pending],
    augmented: int,
    trunk: str,
    activations: bool,
) -> None:
    """One line: what a shard will compute, where, with which trunk (a precision, or int8)."""
    log.info(
        "Features%s of shard %s (%d images) in %s: %d to compute (%s); %d augmented copies "
        "of its %d train and val images: %d to compute",
        " and block-4 activations" if activations else "",
        shard,
        images,
        cache,
        len(originals.todo),
        trunk,
        len(copy_todo),
        augmented,
        sum(len(p.todo) for p in copy_todo),
    )


def _shard_images(
    paths: Sequence[str | Path], shas: Sequence[str], shard: int, shards: int
) -> tuple[dict[str, str | Path], list[str]]:
    """(sha256 → its first path, the sha256s of shard `shard` of `shards`)."""
    source: dict[str, str | Path] = {}
    for path, sha in zip(paths, shas, strict=True):
        source.setdefault(sha, path)
    return source, shard_of(list(source), shard, shards)


def _among(shas: Sequence[str], named: Sequence[str]) -> list[str]:
    """The `shas` that `named` names, in their order."""
    wanted = set(named)
    return [sha for sha in shas if sha in wanted]


def _backend_choice(
    cfg: ModelConfig, source: dict[str, str | Path], augment: Sequence[str], precision: str
) -> tuple[str, Any, str]:
    """(backend, calibration, int8 key) an extraction starts with: int8 where `cfg` asks for it and
    it runs here, calibrated on a seeded sample of the `augment` images (`backends.
    training_calibration`); else keras (one log line says why), with no calibration and no key."""
    from leukemia import backends

    if cfg.backend != backends.INT8:
        return backends.usable_backend(cfg.backend, None, precision), None, ""
    calibration = backends.training_calibration(source, augment, cfg.input_size)
    if backends.usable_backend(cfg.backend, calibration, precision) != backends.INT8:
        return backends.KERAS, None, ""
    return backends.INT8, calibration, backends.features_key(cfg, calibration)


def _extract_reference(
    shas: Sequence[str],
    source: dict[str, str | Path],
    cfg: ModelConfig,
    root: str | Path,
    batch_size: int,
) -> int:
    """Cache the float32 Keras features of `shas` (an int8 extraction's reference images) in
    their folder; returns how many it computed."""
    if not shas:
        return 0
    folder = cache_dir_for(root, cfg, "float32")
    pending = _lacking(folder, shas, False)
    log.info(
        "float32 Keras features of %d reference images (the int8 agreement's) in %s: %d to compute",
        len(shas),
        folder,
        len(pending.todo),
    )
    if pending.todo:
        extractor = build_extractor(cfg, "float32")
        _extract_into(
            pending,
            functools.partial(
                compute_part,
                source=source,
                extractor=extractor,
                size=cfg.input_size,
                batch_size=batch_size,
            ),
        )
    return len(pending.todo)


def extract_features(
    paths: Sequence[str | Path],
    shas: Sequence[str],
    cfg: ModelConfig,
    cache_root: str | Path,
    precision: str = "auto",
    batch_size: int = 32,
    shard: int = 0,
    shards: int = 1,
    augment: Sequence[str] = (),
    copies: int = 0,
    activations: bool = False,
    reference: Sequence[str] = (),
) -> ExtractResult:
    """Compute and cache the pooled features of shard `shard` of `shards` of the images.

    `paths` are local paths or `s3://` URIs, one per sha256; the shard reads only its own images and
    only those no shard file holds yet, and writes a shard file every `IMAGES_PER_SHARD` images (so a
    killed shard resumes from its last file). Then, for each of `copies` augmented copies, the same
    for its images named in `augment` (the train and val images), into `augmented_dir`. With
    `activations`, the same passes also cache the images' block-4 activations (`activations_dir`)
    and compute the images that lack only those. Run again, it computes nothing.

    `cfg.backend` int8: the int8 copy of the trunk (`backends.py`), calibrated on a sample of the
    `augment` images, derived once per worker; where it cannot be had, Keras (one log line says
    why): the features go to the folder of the backend used (`ExtractResult.backend`). An int8
    shard also caches the float32 Keras features of its `reference` images (the test split), what
    a run's int8 agreement is measured against (`reference_dir`).
    """
    from leukemia import backends

    if copies < 0:
        raise ValueError(f"augment_copies must be 0 (no augmentation) or more, got {copies}")
    precision = resolve_precision(precision)
    source, mine = _shard_images(paths, shas, shard, shards)
    augmented = _among(mine, augment)
    backend, calibration, key = _backend_choice(cfg, source, augment, precision)
    cache = cache_dir_for(cache_root, cfg, precision, key)
    originals, copy_todo = _pending(cache, mine, augmented, copies, activations)
    trunk = backend if key else precision
    where = (f"{shard + 1}/{shards}", len(mine), cache)
    _log_todo(*where, originals, copy_todo, len(augmented), trunk, activations)
    started, written = time.monotonic(), 0
    if originals.todo or any(p.todo for p in copy_todo):
        local = backends.cache_root()
        extractor, used = backends.extractor_for(
            backend, cfg, precision, calibration, local, activations
        )
        if used != backend:  # the int8 network could not be derived (logged): the Keras folder
            backend, cache = used, cache_dir_for(cache_root, cfg, precision)
            originals, copy_todo = _pending(cache, mine, augmented, copies, activations)
        started = time.monotonic()  # the rate is the extraction's, not the model build's
        written = _extract_passes(
            originals, copy_todo, source, extractor, cfg.input_size, batch_size
        )
    seconds = time.monotonic() - started
    computed = len(originals.todo) + sum(len(p.todo) for p in copy_todo)
    checked = _among(mine, reference if backend == backends.INT8 else ())
    _extract_reference(checked, source, cfg, cache_root, batch_size)
    return ExtractResult(
        cache_dir=cache,
        images=len(mine),
        computed=len(originals.todo),
        cached=len(mine) - len(originals.todo),
        seconds=round(seconds, 3),
        images_per_s=round(computed / seconds, 2) if computed and seconds > 0 else 0.0,
        precision=precision,
        shard=shard,
        shards=shards,
        parts_written=written,
        copies=copies,
        augmented=computed - len(originals.todo),
        activations=activations,
        backend=backend,
        reference=len(checked),
    )


def _extract_passes(
    originals: Pending,
    copy_todo: Sequence[Pending],
    source: dict[str, str | Path],
    extractor: Any,
    size: int,
    batch_size: int,
) -> int:
    """The originals' pass, then each augmented copy's (`_extract_into`); the files written."""
    from leukemia.augment import augment_batch

    memo = PixelMemo({sha for p in copy_todo for sha in p.todo})
    compute = functools.partial(
        compute_part,
        source=source,
        extractor=extractor,
        size=size,
        batch_size=batch_size,
        memo=memo,
    )
    written = _extract_into(originals, compute)
    for copy, pending in enumerate(copy_todo):
        if pending.todo:
            log.info(
                "Augmented copy %d/%d of %d images", copy + 1, len(copy_todo), len(pending.todo)
            )
        transform = functools.partial(augment_batch, copy=copy)
        written += _extract_into(pending, functools.partial(compute, transform=transform))
    return written


def _index_of(store: Store, shas: Sequence[str], what: str, fix: str) -> dict[str, tuple[str, int]]:
    """`cache_index` of one cache folder, which must hold every image of `shas`: else a
    FileNotFoundError naming how many lack `what`, the first of them, and `fix`."""
    index = cache_index(store)
    missing = [s for s in shas if s not in index]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images have no cached {what} in {store.uri()} (first: "
            f"{missing[0]}): {fix}"
        )
    return index


def select_variant(cached: Any, variant: str) -> Any:
    """The variant's columns of cached rows (n, CACHE_WIDTH) → (n, feature_width(variant))."""
    import numpy as np

    return np.concatenate([cached[:, slice(*_OFFSETS[k])] for k in VARIANTS[variant]], axis=1)


def load_features(cache_dir: str | Path, shas: Sequence[str], variant: str) -> Any:
    """Feature matrix of the given images for one variant, from the cache's shard files.

    Only the variant's arrays of the shard files that hold these images are read.
    """
    import numpy as np

    from leukemia.model import feature_width

    store = open_store(cache_dir)
    index = _index_of(store, shas, "features", "run extract_features for this split first")
    keys = VARIANTS[variant]
    needed = sorted({index[s][0] for s in shas})

    def block(name: str) -> tuple[str, Any]:
        arrays = read_arrays(store, name, keys)
        return name, np.concatenate([arrays[k] for k in keys], axis=1).astype("float32")

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(needed)))) as pool:
        blocks = dict(pool.map(block, needed))
    out = np.zeros((len(shas), feature_width(variant)), dtype="float32")
    for i, sha in enumerate(shas):
        name, row = index[sha]
        out[i] = blocks[name][row]
    return out


def load_copies(cache_dir: str | Path, shas: Sequence[str], variant: str, copies: int) -> Any:
    """The augmented copies' features of the given images: (copies, n, feature_width(variant))."""
    import numpy as np

    from leukemia.model import feature_width

    if not copies or not shas:
        return np.zeros((copies, len(shas), feature_width(variant)), dtype="float32")
    try:
        return np.stack(
            [load_features(augmented_dir(cache_dir, c), shas, variant) for c in range(copies)]
        )
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"augmented copies missing: {exc}; extract with the same augment_copies "
            f"({copies}) as training uses"
        ) from None


def load_activations(
    cache_dir: str | Path, shas: Sequence[str], keys: Sequence[str] = ACTIVATION_KEYS
) -> dict[str, Any]:
    """The cached activation arrays `keys` (of `ACTIVATION_KEYS`) of the given images, row i for
    `shas[i]`, from `activations_dir(cache_dir)` (`cache_dir`: a feature cache folder, or one of
    its `augmented_dir`s). Reads one shard file at a time: memory holds the result and one file."""
    import numpy as np

    if not shas:
        raise ValueError("no images: load_activations needs at least one sha256")
    store = open_store(activations_dir(cache_dir))
    index = _index_of(
        store,
        shas,
        "block-4 activations",
        "extract them with activations=True (the extraction does when fine-tuning from "
        "activations is asked for)",
    )
    by_part: dict[str, tuple[list[int], list[int]]] = {}
    for i, sha in enumerate(shas):
        name, row = index[sha]
        at, rows = by_part.setdefault(name, ([], []))
        at.append(i)
        rows.append(row)
    out: dict[str, Any] = {}
    for name, (at, rows) in sorted(by_part.items()):
        for key, array in read_arrays(store, name, keys).items():
            if key not in out:
                out[key] = np.empty((len(shas), *array.shape[1:]), dtype=array.dtype)
            out[key][at] = array[rows]
    return out


def labels_to_index(labels: Sequence[str]) -> Any:
    """Class names → integer indices in `CLASSES` order."""
    import numpy as np

    index = {c: i for i, c in enumerate(CLASSES)}
    return np.asarray([index[label] for label in labels], dtype="int64")
