"""Manifest, duplicate grouping, label conflicts and the stable, stratified split."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from leukemia.config import CLASSES
from leukemia.dataset import (
    ImageRecord,
    assign_split,
    build_manifest,
    make_split,
    read_split,
    split_records,
)


def _records(n_per_class: int, tag: str = "") -> list[ImageRecord]:
    return [
        ImageRecord(f"{c}/{tag}{i}.jpg", c, hashlib.sha256(f"{c}{tag}{i}".encode()).hexdigest())
        for c in CLASSES
        for i in range(n_per_class)
    ]


def test_split_is_stratified_close_to_fractions() -> None:
    rows, conflicts, _ = split_records(_records(400), seed=3)
    assert not conflicts
    for label in CLASSES:
        counts = Counter(r["split"] for r in rows if r["label"] == label)
        # hash assignment: each class's fractions are binomial around the targets (sd ~0.02 here)
        assert abs(counts["train"] / 400 - 0.70) < 0.08
        assert abs(counts["val"] / 400 - 0.15) < 0.07
        assert abs(counts["test"] / 400 - 0.15) < 0.07


def test_adding_images_never_moves_existing_ones() -> None:
    before = {r["path"]: r["split"] for r in split_records(_records(50), seed=0)[0]}
    after = {
        r["path"]: r["split"] for r in split_records(_records(50) + _records(50, "new"), seed=0)[0]
    }
    assert len(after) == 400
    assert all(after[p] == s for p, s in before.items())


def test_seed_changes_the_assignment() -> None:
    a = [r["split"] for r in split_records(_records(50), seed=0)[0]]
    b = [r["split"] for r in split_records(_records(50), seed=1)[0]]
    assert a != b


def test_identical_images_never_straddle_splits() -> None:
    records = _records(30)
    # 40 byte-identical pairs, as in the public data set's Pro class
    twins = [ImageRecord(f"Pro/twin{i}.jpg", "Pro", r.sha256) for i, r in enumerate(records[-30:])]
    rows, conflicts, groups = split_records(records + twins, seed=0)
    assert groups == 30 and not conflicts
    by_sha: dict[str, set[str]] = {}
    for r in rows:
        by_sha.setdefault(r["sha256"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_sha.values())


def test_label_conflict_is_reported_and_left_out() -> None:
    records = _records(5)
    clash = ImageRecord("Early/clash.jpg", "Early", records[0].sha256)  # same bytes as a Benign one
    rows, conflicts, _ = split_records(records + [clash], seed=0)
    assert len(conflicts) == 1
    assert conflicts[0]["labels"] == ["Benign", "Early"]
    assert records[0].path not in {r["path"] for r in rows}
    assert len(rows) == len(records) - 1


def test_label_conflict_leaves_out_every_copy_including_the_majority_and_names_it() -> None:
    records = _records(5)
    sha = records[0].sha256  # Benign/0.jpg, copied three times under Pro
    copies = [ImageRecord(f"Pro/copy{i}.jpg", "Pro", sha) for i in range(3)]

    rows, conflicts, _ = split_records(records + copies, seed=0)

    assert conflicts == [
        {
            "sha256": sha,
            "labels": ["Benign", "Pro"],
            "paths": ["Benign/0.jpg", "Pro/copy0.jpg", "Pro/copy1.jpg", "Pro/copy2.jpg"],
            "majority": "Pro",
        }
    ]
    assert len(rows) == len(records) - 1 and sha not in {r["sha256"] for r in rows}


def test_bad_fractions_raise() -> None:
    with pytest.raises(ValueError, match="sum"):
        split_records(_records(2), fractions=(0.5, 0.5, 0.5))


def test_assign_split_respects_zero_fraction() -> None:
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(200)]
    assert {assign_split(s, 0, (0.8, 0.0, 0.2)) for s in shas} == {"train", "test"}


def test_make_split_on_a_folder(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for i, label in enumerate(CLASSES * 3):
        (images / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (i * 9 % 255, 80, 120)).save(images / label / f"{i}.png")
    shutil.copy(images / "Pro" / "3.png", images / "Pro" / "3-copy.png")
    info = make_split(images, tmp_path / "splits", seed=0)
    rows = read_split(info.path)
    assert info.images == len(rows) == 13
    assert info.duplicate_groups == 1
    assert info.digest[:16] in Path(info.path).name
    assert sum(sum(c.values()) for c in info.counts.values()) == 13
    assert {r["split"] for r in rows if r["path"].startswith("Pro/3")} in (
        {"train"},
        {"val"},
        {"test"},
    )
    # same folder, same digest and file; one more image, new digest
    assert make_split(images, tmp_path / "splits", seed=0).path == info.path
    Image.new("RGB", (40, 40), (1, 2, 3)).save(images / "Early" / "extra.png")
    assert make_split(images, tmp_path / "splits", seed=0).digest != info.digest


def test_manifest_errors_name_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Benign\\|Early\\|Pre\\|Pro"):
        build_manifest(tmp_path)
