"""The journal's SQLite schema: creation, checks and numbered migrations.

A new journal is made by running version 1's script and then every migration, in one
transaction, so a fresh file and an upgraded one are the same by construction. An older file is
upgraded when it is opened for writing (under the journal's lock), one migration per
transaction; :func:`~emo_async._journal.summary.read_summary` reads any version it knows as it is.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

from .._exceptions import JournalCorruptError, JournalError
from .connection import connect

__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "check_header", "check_schema", "inspect", "upgrade"]

SCHEMA_NAME: Final = "emo_async.journal"

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"

#: Version 1, as emo_async first wrote it. Never edit it: old files were made by it.
SCHEMA_V1: Final = f"""
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (name, value) VALUES ('schema', '{SCHEMA_NAME}'), ('version', '1');
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    job TEXT NOT NULL,
    phase TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    task_id TEXT,
    intent_at TEXT,
    submitted_at TEXT,
    task_status TEXT,
    video_url TEXT,
    url_deadline TEXT,
    billed_seconds REAL,
    billed_earlier REAL NOT NULL DEFAULT 0,
    path TEXT,
    size INTEGER,
    sha256 TEXT,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX jobs_phase ON jobs (phase);
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    submitted_at TEXT
);
CREATE TRIGGER jobs_task_history AFTER UPDATE OF task_id ON jobs
WHEN NEW.task_id IS NOT NULL AND NEW.task_id IS NOT OLD.task_id
BEGIN
    INSERT INTO tasks (task_id, key, submitted_at) VALUES (NEW.task_id, NEW.key, NEW.submitted_at);
END;
CREATE TABLE detections (
    image_digest TEXT NOT NULL,
    ratio TEXT NOT NULL,
    detection TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (image_digest, ratio)
);
CREATE TABLE uploads (
    digest TEXT NOT NULL,
    model TEXT NOT NULL,
    url TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (digest, model)
);
"""

#: Migration N takes a journal from version N - 1 to N (each ends by setting the version).
MIGRATIONS: Final[dict[int, str]] = {
    # Unresolved jobs: why they are, and the unattributed tasks that may be theirs. The triggers
    # keep candidates honest whatever writes the job: a job leaving "unresolved" drops its
    # candidates, and a task recorded as some job's stops being anyone's candidate.
    2: """
ALTER TABLE jobs ADD COLUMN reason TEXT;
CREATE TABLE candidates (
    key TEXT NOT NULL,
    task_id TEXT NOT NULL,
    created_at TEXT,
    status TEXT,
    video_duration REAL,
    video_url TEXT,
    url_deadline TEXT,
    path TEXT,
    size INTEGER,
    sha256 TEXT,
    PRIMARY KEY (key, task_id)
);
CREATE INDEX candidates_task ON candidates (task_id);
CREATE TRIGGER jobs_settled AFTER UPDATE OF phase ON jobs
WHEN NEW.phase IS NOT 'unresolved'
BEGIN
    DELETE FROM candidates WHERE key = NEW.key;
END;
CREATE TRIGGER tasks_owned AFTER INSERT ON tasks
BEGIN
    DELETE FROM candidates WHERE task_id = NEW.task_id;
END;
UPDATE meta SET value = '2' WHERE name = 'version';
""",
}

SCHEMA_VERSION: Final = max(MIGRATIONS)

#: The tables each version has (a file missing one is damaged).
_TABLES: Final = {
    1: frozenset({"meta", "jobs", "tasks", "detections", "uploads"}),
    2: frozenset({"meta", "jobs", "tasks", "detections", "uploads", "candidates"}),
}


def check_header(path: Path) -> bool:
    """Whether ``path`` holds data (False: absent or empty); raise if it is not SQLite."""
    if path.is_dir():
        raise JournalError(f"journal path {path} is a directory, not a file")
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc}") from None
    if not head:
        return False
    if head != _SQLITE_MAGIC:
        raise JournalCorruptError(
            f"{path} is not an emo_async journal (not an SQLite database); it was left untouched"
        )
    return True


def check_schema(conn: sqlite3.Connection, path: Path) -> int:
    """Validate our meta and tables; return the file's version (0: an SQLite file without any
    table, a fresh one)."""
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            return 0
        if "meta" not in tables:
            shown = ", ".join(sorted(tables)[:5])
            raise JournalCorruptError(
                f"{path} is an SQLite database but not an emo_async journal (it has tables:"
                f" {shown}); it was left untouched"
            )
        meta = {str(row[0]): str(row[1]) for row in conn.execute("SELECT name, value FROM meta")}
    except sqlite3.Error as exc:
        raise JournalCorruptError(
            f"{path} is damaged or not an emo_async journal ({exc}); it was left untouched"
        ) from None
    if meta.get("schema") != SCHEMA_NAME:
        raise JournalCorruptError(
            f"{path} is an SQLite database but not an emo_async journal"
            f" (schema {meta.get('schema')!r}); it was left untouched"
        )
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise JournalCorruptError(
            f"journal {path} has an unreadable version {meta.get('version')!r}"
        ) from None
    if version > SCHEMA_VERSION:
        raise JournalCorruptError(
            f"journal {path} was written by a newer emo_async (journal version {version}; this"
            f" version reads {SCHEMA_VERSION}); upgrade emo_async to use it"
        )
    if version < 1:
        raise JournalCorruptError(f"journal {path} has an invalid version {version}")
    missing = _TABLES[version] - tables
    if missing:
        raise JournalCorruptError(
            f"journal {path} is damaged: missing table(s) {', '.join(sorted(missing))}"
        )
    return version


def inspect(path: Path) -> int:
    """The version of our journal at ``path`` (0: absent, empty or a fresh SQLite file).

    A file with data is looked at through a read-only connection: a foreign database is never
    opened for writing, so nothing (not even a checkpoint) can change it.
    """
    if not check_header(path):
        return 0
    try:
        conn = connect(path, read_only=True)
    except sqlite3.Error as exc:
        raise JournalCorruptError(f"cannot open journal {path} ({exc})") from None
    try:
        return check_schema(conn, path)
    finally:
        conn.close()


def upgrade(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Set the pragmas and bring the journal from ``version`` (0: nothing yet) to the current
    one. Runs outside any transaction (it opens its own)."""
    conn.execute("PRAGMA journal_mode = WAL").fetchall()
    # FULL: a WAL commit is fsynced before it returns, so an intent survives a power cut.
    conn.execute("PRAGMA synchronous = FULL")
    if version:
        rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check(1)")]
        if rows != ["ok"]:
            raise JournalCorruptError(f"journal {path} is damaged: {'; '.join(rows)}")
        steps = [(n, MIGRATIONS[n]) for n in range(version + 1, SCHEMA_VERSION + 1)]
    else:
        # The schema and its meta land in one transaction, whole or not at all.
        whole = "".join([SCHEMA_V1, *(MIGRATIONS[n] for n in sorted(MIGRATIONS))])
        steps = [(SCHEMA_VERSION, whole)]
    for number, script in steps:
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{script}\nCOMMIT;")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if version and isinstance(exc, sqlite3.Error):
                raise JournalError(
                    f"cannot upgrade journal {path} to version {number}: {exc}; it was left"
                    f" at version {number - 1}"
                ) from exc
            raise
