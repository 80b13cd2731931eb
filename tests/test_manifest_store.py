"""The sync's manifest state in SQLite: what a kill leaves, and the cost of a checkpoint.

The sync itself (resume after a kill, the exported `sync_manifest.json`) is tested through
`sync_images` in test_storage.py.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from leukemia import manifest_store
from leukemia.config import CLASSES
from leukemia.manifest_store import MANIFEST_NAME, STATE_NAME, ManifestStore
from leukemia.storage import load_manifest


def image_entry(i: int) -> tuple[str, dict[str, Any]]:
    """A manifest entry shaped like the sync's, for key number `i` (keys sort as `i` does)."""
    label = CLASSES[0]
    return f"raw/{label}/img-{i:06d}.jpg", {
        "size": 20_000 + i,
        "etag": hashlib.md5(str(i).encode()).hexdigest(),
        "last_modified": "2026-01-01T00:00:00+00:00",
        "path": f"{label}/img-{i:06d}.jpg",
        "label": label,
        "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
    }


def state_files(root: Path) -> dict[str, bytes]:
    """The state database and its journal, byte for byte, as a kill would leave them now."""
    return {p.name: p.read_bytes() for p in root.glob(f"{STATE_NAME}*")}


def test_state_left_by_a_kill_in_the_middle_of_a_checkpoint_reads_back_as_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    # A page cache of 16 pages: the second checkpoint spills to the database file before it
    # commits, as a large one does on a full cache.
    with mock.patch.object(manifest_store, "CACHE_KIB", 64), ManifestStore.open(live) as store:
        for i in range(100):
            store.put_image(*image_entry(i))
        store.commit()
        committed = state_files(live)
        for i in range(100, 3000):
            store.put_image(*image_entry(i))
        mid_checkpoint = state_files(live)  # what a SIGKILL now would leave on disk
        assert mid_checkpoint != committed  # the checkpoint under way already wrote to disk
        killed = tmp_path / "killed"
        killed.mkdir()
        for name, data in mid_checkpoint.items():
            (killed / name).write_bytes(data)

    assert sorted(load_manifest(killed)["images"]) == sorted(image_entry(i)[0] for i in range(100))


def thread_bytes_written() -> int:
    """Bytes this thread has passed to write() and pwrite() (Linux per-thread I/O accounting)."""
    with open("/proc/thread-self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("wchar:"))


@pytest.mark.skipif(
    not Path("/proc/thread-self/io").exists(), reason="needs Linux per-thread I/O accounting"
)
def test_checkpoint_writes_no_more_bytes_with_20000_objects_recorded_than_with_1000(
    tmp_path: Path,
) -> None:
    """The work per checkpoint stays constant: it does not grow with what is recorded already."""

    def checkpoint_bytes(store: ManifestStore, first: int) -> int:
        before = thread_bytes_written()
        for i in range(first, first + 100):  # in key order, as downloads finish
            store.put_image(*image_entry(i))
        store.commit()
        return thread_bytes_written() - before

    with ManifestStore.open(tmp_path) as store:
        for i in range(1000):
            store.put_image(*image_entry(i))
        store.commit()
        early = sum(checkpoint_bytes(store, 1000 + 100 * n) for n in range(5))
        for i in range(1500, 20_000):
            store.put_image(*image_entry(i))
        store.commit()
        late = sum(checkpoint_bytes(store, 20_000 + 100 * n) for n in range(5))

    assert 0 < early and late <= 1.5 * early, (early, late)
    assert late / 500 < 4096  # under one page per object; a whole rewrite is ~170 B x 20,000


def test_export_is_exactly_what_json_dumps_indent_1_sort_keys_writes(tmp_path: Path) -> None:
    """Readers and the work store see the same `sync_manifest.json` as before the state existed."""
    manifest = {
        "images": dict(image_entry(i) for i in (3, 1, 2)),
        "rejected": {
            'raw/Pro/ünïcode "quoted".jpg': {
                "size": 9,
                "etag": "e",
                "last_modified": "2026-01-01T00:00:00+00:00",
                "reason": "not an image\nsecond line",
            }
        },
    }
    head = {"bucket": "b", "digest": "d" * 64, "prefix": "raw/"}
    with ManifestStore.open(tmp_path) as store:
        store.replace(manifest)
        full = "".join(store.manifest_chunks(head))
        store.replace({"images": {}, "rejected": {}})
        empty = "".join(store.manifest_chunks(head))

    assert full == json.dumps({**manifest, **head}, indent=1, sort_keys=True)
    assert empty == json.dumps({"images": {}, "rejected": {}, **head}, indent=1, sort_keys=True)


def test_state_from_a_newer_version_is_refused_with_what_to_do(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / STATE_NAME)
    db.execute(f"PRAGMA user_version={manifest_store.SCHEMA_VERSION + 1}")
    db.close()

    with pytest.raises(RuntimeError, match=f"delete it.*rebuilds it from {MANIFEST_NAME}"):
        ManifestStore.open(tmp_path)


def test_unreadable_state_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / STATE_NAME).write_bytes(b"not a database, a file cut short by a full disk" * 100)

    with pytest.raises(RuntimeError, match="not a readable sync state.*delete it"):
        ManifestStore.open(tmp_path)
