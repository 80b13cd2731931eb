"""The dataset: manifest (path, class, sha256), duplicate groups, label conflicts and a stable split.

The split assigns each *content hash* to train/val/test from a salted hash of that content, so
byte-identical images always land together, adding images never moves existing ones, and each
class is split in the requested proportions (in expectation, class by class). The split CSV is
written to any location (a folder or the work store's `s3://…/splits/`), named by the dataset digest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES
from leukemia.images import iter_image_files
from leukemia.objectstore import join, read_location, write_location
from leukemia.storage import MANIFEST_NAME, dataset_digest, label_conflicts

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: The splits heads train on (train; val too in CV and the refit): the images that get augmented copies.
TRAINING_SPLITS = SPLITS[:2]
SPLIT_FIELDS = ("path", "label", "sha256", "split")


@dataclass(frozen=True)
class ImageRecord:
    """One image of the manifest; `path` is relative to the images folder."""

    path: str
    label: str
    sha256: str


@dataclass
class SplitInfo:
    """Where a split was written (a path or a URI) and what it holds (small: fits in XCom)."""

    path: str
    digest: str
    counts: dict[str, dict[str, int]]
    images: int
    duplicate_groups: int
    conflicts: list[dict[str, object]]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (model files are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(images_dir: str | Path) -> list[ImageRecord]:
    """Records for every image under `images_dir`.

    Uses the sync manifest's hashes when the folder came from `sync_images`, otherwise reads the
    `<Class>/<name>` folder (e.g. the public data set used in place).
    """
    root = Path(images_dir)
    sync_manifest = root / MANIFEST_NAME
    if sync_manifest.exists():
        records = records_from_manifest(json.loads(sync_manifest.read_text()))
    else:
        records = [
            ImageRecord(str(p.relative_to(root).as_posix()), label, file_sha256(p))
            for label, p in iter_image_files(root)
        ]
    if not records:
        raise ValueError(
            f"no images under {root}: expected {root}/<Benign|Early|Pre|Pro>/<name>.jpg "
            "(run the sync first, or point to a folder in that layout)"
        )
    return sorted(records, key=lambda r: r.path)


def records_from_manifest(manifest: Mapping[str, Any]) -> list[ImageRecord]:
    """Records of a sync manifest (`storage.sync_images`); paths relative to the synced prefix."""
    entries = manifest.get("images", {}).values()
    return sorted(
        (ImageRecord(e["path"], e["label"], e["sha256"]) for e in entries), key=lambda r: r.path
    )


def assign_split(sha256: str, seed: int, fractions: Sequence[float]) -> str:
    """The split of one content hash: a salted hash mapped to [0, 1) against the cumulative fractions."""
    u = int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:15], 16) / 16**15
    edge = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def split_records(
    records: Iterable[ImageRecord], seed: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> tuple[list[dict[str, str]], list[dict[str, object]], int]:
    """Rows with a `split` column, the label conflicts left out, and the number of duplicate groups.

    Content under more than one class is left out entirely (`storage.LabelConflict`); each conflict
    is {sha256, labels, paths, majority} (majority None on a tie).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"split fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    records = list(records)
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for rec in records:
        by_hash[rec.sha256].append(rec)
    rows: list[dict[str, str]] = []
    conflicts: list[dict[str, object]] = []
    for conflict in label_conflicts((r.path, r.label, r.sha256) for r in records):
        paths = sorted(p for names in conflict.copies.values() for p in names)
        conflicts.append(
            {
                "sha256": conflict.sha256,
                "labels": list(conflict.copies),
                "paths": paths,
                "majority": conflict.majority,
            }
        )
        log.warning("%s (%s)", conflict.reason, ", ".join(paths))
        del by_hash[conflict.sha256]
    duplicate_groups = 0
    for sha, group in sorted(by_hash.items()):
        duplicate_groups += len(group) > 1
        split = assign_split(sha, seed, fractions)
        rows.extend(
            {"path": r.path, "label": r.label, "sha256": sha, "split": split}
            for r in sorted(group, key=lambda r: r.path)
        )
    rows.sort(key=lambda r: r["path"])
    return rows, conflicts, duplicate_groups


def split_counts(rows: Iterable[dict[str, str]]) -> dict[str, dict[str, int]]:
    """Images per split and class, every class present (zeros included)."""
    counter = Counter((r["split"], r["label"]) for r in rows)
    return {s: {c: counter[(s, c)] for c in CLASSES} for s in SPLITS}


def write_split_csv(rows: Iterable[dict[str, str]], location: str | Path) -> str:
    """Write split rows as CSV (path,label,sha256,split) to a path or URI, whole or not at all."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SPLIT_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return write_location(location, text.getvalue().encode())


def read_split(location: str | Path) -> list[dict[str, str]]:
    """Rows of a split CSV written by `make_split` (a path or a URI)."""
    return list(csv.DictReader(io.StringIO(read_location(location).decode(), newline="")))


def training_shas(rows: Iterable[dict[str, str]]) -> list[str]:
    """The sha256 of the split rows heads train on (`TRAINING_SPLITS`), in row order."""
    return [r["sha256"] for r in rows if r["split"] in TRAINING_SPLITS]


def make_split(
    images_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> SplitInfo:
    """Manifest of a local folder → grouped, stable split saved as `<out_dir>/split-<digest>.csv`."""
    return save_split(build_manifest(images_dir), out_dir, seed, fractions)


def save_split(
    records: Sequence[ImageRecord],
    out_dir: str | Path,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> SplitInfo:
    """Records → grouped, stable split saved at `<out_dir>/split-<digest>-seed<seed>.csv`.

    `out_dir` is a folder or a URI (the work store); the name is keyed by the dataset digest, so a
    retried or repeated split of the same images writes the same object.
    """
    if not records:
        raise ValueError(
            "no images to split: expected <prefix>/<Benign|Early|Pre|Pro>/<name>.jpg "
            "(run the sync first, or point to a folder in that layout)"
        )
    digest = dataset_digest((r.label, r.sha256) for r in records)
    rows, conflicts, groups = split_records(records, seed, fractions)
    path = write_split_csv(rows, join(out_dir, f"split-{digest[:16]}-seed{seed}.csv"))
    counts = split_counts(rows)
    log.info(
        "Split %d images (%d duplicate groups kept together, %d label conflicts left out): %s",
        len(rows),
        groups,
        len(conflicts),
        ", ".join(f"{s} {sum(counts[s].values())}" for s in SPLITS),
    )
    return SplitInfo(path, digest, counts, len(rows), groups, conflicts)
