"""The sync manifest of one local folder, kept in SQLite beside the images (`sync_state.sqlite`).

The sync records each object as it lands and commits every `checkpoint_every` objects: the work per
object is constant (a few B-tree pages, however many objects are recorded already), a resumed sync
reads only the rows it looks up, and memory stays flat at any scale. The listing a sync compares
with the manifest, and the downloads it queues, live in temporary tables of the same connection.

A kill leaves the state at its last commit: SQLite's rollback journal undoes a commit cut short,
and every row records a file already in place, so resuming from any commit is safe.
`sync_manifest.json`, the file that readers and the work store use, is exported from the state at
the end of a sync, in the same format as before, and only when something changed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

MANIFEST_NAME = "sync_manifest.json"
STATE_NAME = "sync_state.sqlite"
SCHEMA_VERSION = 1
#: SQLite's page cache for one sync, in KiB; it spills to disk beyond that, so memory stays flat.
CACHE_KIB = 8 * 1024
#: Rows read per query when walking a table: bounded memory, and no statement left open while
#: the caller writes.
CHUNK = 1000

IMAGE_FIELDS = ("size", "etag", "last_modified", "path", "label", "sha256")
REJECTED_FIELDS = ("size", "etag", "last_modified", "reason")
_LISTED_AS = "{t}.size = l.size AND {t}.etag = l.etag AND {t}.last_modified = l.last_modified"

_SCHEMA = (
    "CREATE TABLE images (key TEXT PRIMARY KEY, size INTEGER NOT NULL, etag TEXT NOT NULL, "
    "last_modified TEXT NOT NULL, path TEXT NOT NULL, label TEXT NOT NULL, sha256 TEXT NOT NULL) "
    "WITHOUT ROWID",
    "CREATE INDEX images_path ON images (path)",
    "CREATE TABLE rejected (key TEXT PRIMARY KEY, size INTEGER NOT NULL, etag TEXT NOT NULL, "
    "last_modified TEXT NOT NULL, reason TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)
_SCRATCH = (
    "CREATE TEMP TABLE listing (key TEXT PRIMARY KEY, size INTEGER NOT NULL, etag TEXT NOT NULL, "
    "last_modified TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TEMP TABLE queue (seq INTEGER PRIMARY KEY, key TEXT NOT NULL, size INTEGER NOT NULL, "
    "etag TEXT NOT NULL, last_modified TEXT NOT NULL, rel TEXT NOT NULL UNIQUE, old TEXT)",
    "CREATE TEMP TABLE present (path TEXT PRIMARY KEY) WITHOUT ROWID",
)


class ManifestStore:
    """One folder's manifest (images and remembered rejects, by key) and one sync's scratch tables.

    Use it from the thread that opened it. Leaving the `with` block commits; an exception rolls
    back to the last commit.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._export_invalidated = False

    @classmethod
    def open(cls, root: Path) -> ManifestStore:
        """Open (or create) the state of `root`; a folder synced before it existed starts from its
        `sync_manifest.json`."""
        path = Path(root) / STATE_NAME
        db = sqlite3.connect(path, timeout=60)
        try:
            db.execute("PRAGMA journal_mode=TRUNCATE")
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            store = cls(db)
            store._create(Path(root))
            for ddl in _SCRATCH:
                db.execute(ddl)
        except sqlite3.DatabaseError as exc:
            db.close()
            if isinstance(exc, sqlite3.OperationalError):  # locked, I/O: not the file's content
                raise
            raise RuntimeError(
                f"{path} is not a readable sync state ({exc}): delete it, and the next sync "
                f"rebuilds it from {MANIFEST_NAME} (fetching again what that file does not record)"
            ) from exc
        except BaseException:
            db.close()
            raise
        return store

    def _create(self, root: Path) -> None:
        """Create the tables once, importing the folder's JSON manifest, in one transaction."""
        if self._version() == SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")
        version = self._version()  # another process may have created it while this one waited
        if version == 0:
            for ddl in _SCHEMA:
                self._db.execute(ddl)
            if (legacy := root / MANIFEST_NAME).exists():
                self.replace(json.loads(legacy.read_text()))
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db.commit()
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(
                f"{root / STATE_NAME} has schema version {version}, this code reads "
                f"{SCHEMA_VERSION}: delete it, and the next sync rebuilds it from {MANIFEST_NAME} "
                "(fetching again what that file does not record)"
            )

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def __enter__(self) -> ManifestStore:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self._db.commit()
            else:
                self._db.rollback()
        finally:
            self._db.close()

    def commit(self) -> None:
        """Make every change so far durable: a checkpoint a killed sync resumes from."""
        self._db.commit()

    # --- the manifest -------------------------------------------------------------------------

    def _changed(self) -> None:
        """The exported JSON no longer matches: forget it was current, in the same transaction."""
        if not self._export_invalidated:
            self._export_invalidated = True
            self._db.execute("DELETE FROM meta WHERE name = 'export'")

    def replace(self, manifest: Mapping[str, Any]) -> None:
        """Hold exactly the images and rejected objects of `manifest` (a `sync_manifest.json`)."""
        self._changed()
        self._db.execute("DELETE FROM images")
        self._db.execute("DELETE FROM rejected")
        images = manifest.get("images", {}).items()
        self._db.executemany(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((key, *(e[f] for f in IMAGE_FIELDS)) for key, e in images),
        )
        rejected = manifest.get("rejected", {}).items()
        self._db.executemany(
            "INSERT INTO rejected VALUES (?, ?, ?, ?, ?)",
            ((key, *(e[f] for f in REJECTED_FIELDS)) for key, e in rejected),
        )

    def put_image(self, key: str, entry: Mapping[str, Any]) -> None:
        self._changed()
        self._db.execute(
            "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, *(entry[f] for f in IMAGE_FIELDS)),
        )

    def drop_image(self, key: str) -> None:
        self._changed()
        self._db.execute("DELETE FROM images WHERE key = ?", (key,))

    def put_rejected(self, key: str, entry: Mapping[str, Any]) -> None:
        self._changed()
        self._db.execute(
            "INSERT OR REPLACE INTO rejected VALUES (?, ?, ?, ?, ?)",
            (key, *(entry[f] for f in REJECTED_FIELDS)),
        )

    def drop_rejected(self, key: str) -> None:
        if self._db.execute("DELETE FROM rejected WHERE key = ?", (key,)).rowcount:
            self._changed()

    def image_owner(self, path: str) -> str | None:
        """The key whose image the manifest records at `path`, if any."""
        row = self._db.execute("SELECT key FROM images WHERE path = ? LIMIT 1", (path,)).fetchone()
        return None if row is None else str(row[0])

    def unrecorded(self, paths: Iterable[str]) -> list[str]:
        """The `paths` (local files, `<Class>/<name>`) that no image of the manifest owns, sorted."""
        self._db.execute("DELETE FROM present")
        self._db.executemany("INSERT OR IGNORE INTO present VALUES (?)", ((p,) for p in paths))
        sql = "SELECT path FROM present WHERE path NOT IN (SELECT path FROM images) ORDER BY path"
        return [path for (path,) in self._db.execute(sql)]

    def count_images(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def digest_entries(self) -> Iterator[tuple[str, str]]:
        """(class, sha256) of every image, sorted as Python sorts them (all ASCII)."""
        yield from self._db.execute("SELECT label, sha256 FROM images ORDER BY label, sha256")

    def conflicting_entries(self) -> list[tuple[str, str, str]]:
        """(key, class, sha256) of every image whose content is also stored under another class."""
        return self._db.execute(
            "SELECT key, label, sha256 FROM images WHERE sha256 IN (SELECT sha256 FROM images "
            "GROUP BY sha256 HAVING COUNT(DISTINCT label) > 1) ORDER BY key"
        ).fetchall()

    def to_dict(self) -> dict[str, Any]:
        """The whole manifest in memory, as `sync_manifest.json` holds it (without its header)."""
        return {
            "images": {
                key: dict(zip(IMAGE_FIELDS, rest, strict=True))
                for key, *rest in self._db.execute("SELECT * FROM images")
            },
            "rejected": {
                key: dict(zip(REJECTED_FIELDS, rest, strict=True))
                for key, *rest in self._db.execute("SELECT * FROM rejected")
            },
        }

    # --- one sync's listing and queue ---------------------------------------------------------

    def set_listing(self, rows: Iterable[tuple[str, int, str, str]]) -> int:
        """Hold the listing (key, size, ETag, last modified) to compare with; the number listed."""
        self._db.execute("DELETE FROM listing")
        self._db.executemany("INSERT OR REPLACE INTO listing VALUES (?, ?, ?, ?)", rows)
        return int(self._db.execute("SELECT COUNT(*) FROM listing").fetchone()[0])

    def unchanged(self) -> int:
        """Listed objects that the manifest records with the same identity."""
        sql = "SELECT COUNT(*) FROM listing l JOIN images i ON i.key = l.key WHERE "
        return int(self._db.execute(sql + _LISTED_AS.format(t="i")).fetchone()[0])

    def unlisted_images(self) -> Iterator[tuple[str, str]]:
        """(key, path) of the images no longer listed; the caller may drop each as it goes."""
        yield from self._walk(
            "SELECT key, path FROM images WHERE key > ? AND key NOT IN (SELECT key FROM listing) "
            "ORDER BY key",
            "",
        )

    def drop_unlisted_rejected(self) -> None:
        sql = "DELETE FROM rejected WHERE key NOT IN (SELECT key FROM listing)"
        if self._db.execute(sql).rowcount:
            self._changed()

    def changed_listing(self) -> Iterator[tuple[str, dict[str, Any], str | None, str | None]]:
        """(key, identity, reason, old path) of each listed object not recorded as it is listed,
        in key order: `reason` when that very object was rejected before, `old path` when the
        manifest holds an older version of it."""
        rows = self._walk(
            "SELECT l.key, l.size, l.etag, l.last_modified, "
            f"CASE WHEN {_LISTED_AS.format(t='r')} THEN r.reason END, i.path "
            "FROM listing l LEFT JOIN images i ON i.key = l.key "
            "LEFT JOIN rejected r ON r.key = l.key "
            f"WHERE l.key > ? AND (i.key IS NULL OR NOT ({_LISTED_AS.format(t='i')})) "
            "ORDER BY l.key",
            "",
        )
        for key, size, etag, modified, reason, old in rows:
            yield key, {"size": size, "etag": etag, "last_modified": modified}, reason, old

    def enqueue(self, key: str, ident: Mapping[str, Any], rel: str, old: str | None) -> None:
        """Queue `key` for download to the local file `rel` (replacing `old`, if any)."""
        self._db.execute(
            "INSERT INTO queue (key, size, etag, last_modified, rel, old) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, ident["size"], ident["etag"], ident["last_modified"], rel, old),
        )

    def queued_owner(self, rel: str) -> str | None:
        """The key queued for the local file `rel`, if any."""
        row = self._db.execute("SELECT key FROM queue WHERE rel = ?", (rel,)).fetchone()
        return None if row is None else str(row[0])

    def count_queued(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0])

    def queued(self) -> Iterator[tuple[str, dict[str, Any], str, str | None]]:
        """(key, identity, rel, old) of each queued download, in the order queued."""
        rows = self._walk(
            "SELECT seq, key, size, etag, last_modified, rel, old FROM queue WHERE seq > ? "
            "ORDER BY seq",
            0,
        )
        for _, key, size, etag, modified, rel, old in rows:
            yield key, {"size": size, "etag": etag, "last_modified": modified}, rel, old

    def _walk(self, sql: str, start: Any) -> Iterator[tuple[Any, ...]]:
        """Rows of `sql`, whose `?` bounds its first column from below, CHUNK rows a query."""
        after = start
        while rows := self._db.execute(f"{sql} LIMIT {CHUNK}", (after,)).fetchall():
            yield from rows
            after = rows[-1][0]

    # --- the exported JSON --------------------------------------------------------------------

    def manifest_chunks(self, head: Mapping[str, str]) -> Iterator[str]:
        """`sync_manifest.json` with the fields of `head`, exactly as `json.dumps(manifest,
        indent=1, sort_keys=True)` writes it, a piece at a time."""
        sections = {"images": ("images", IMAGE_FIELDS), "rejected": ("rejected", REJECTED_FIELDS)}
        for i, name in enumerate(sorted([*head, *sections])):
            yield f"{',' if i else '{'}\n {json.dumps(name)}: "
            if name in sections:
                yield from self._section_chunks(*sections[name])
            else:
                yield json.dumps(head[name])
        yield "\n}"

    def _section_chunks(self, table: str, fields: tuple[str, ...]) -> Iterator[str]:
        columns = sorted((json.dumps(name), i) for i, name in enumerate(fields))
        sql = f"SELECT key, {', '.join(fields)} FROM {table} ORDER BY key"
        first = True
        for key, *values in self._db.execute(sql):
            body = ",\n   ".join(f"{name}: {json.dumps(values[i])}" for name, i in columns)
            yield f"{'{' if first else ','}\n  {json.dumps(key)}: {{\n   {body}\n  }}"
            first = False
        yield "{}" if first else "\n }"

    def export_is_current(self, path: Path, head: Mapping[str, str]) -> bool:
        """True when `path` is the export of the state as it is now, with the fields of `head`."""
        row = self._db.execute("SELECT value FROM meta WHERE name = 'export'").fetchone()
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        seen = {**head, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return row is not None and json.loads(row[0]) == seen

    def mark_exported(self, path: Path, head: Mapping[str, str]) -> None:
        """Remember that `path` now holds the export (until the next change)."""
        stat = path.stat()
        value = json.dumps({**head, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('export', ?)", (value,))
        self._export_invalidated = False
