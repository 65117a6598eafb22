"""Journals written by earlier versions open, keep every row, and are upgraded in place."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import pytest

from emo_async._exceptions import JournalError
from emo_async._journal import (
    SCHEMA_VERSION,
    Candidate,
    JobPhase,
    open_journal,
    read_summary,
)
from emo_async._models import Detection, ErrorInfo, Job

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

# Version 1 as emo_async 0.x wrote it (emo_async/_journal.py at ab2c205), copied verbatim: the
# fixture must not move when the code's schema does.
_V1 = """
BEGIN IMMEDIATE;
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (name, value) VALUES ('schema', 'emo_async.journal'), ('version', '1');
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
COMMIT;
"""

_DETECTION = Detection(True, (10, 20, 30, 40), (0, 0, 100, 137), ratio="1:1")


def _ts(value: dt.datetime) -> str:
    return value.isoformat(timespec="microseconds")


def _job_json(name: str) -> str:
    return json.dumps(
        {
            "image": "/data/p.png",
            "audio": "https://example.com/v.wav",
            "name": name,
            "style_level": "normal",
            "ratio": None,
            "face_bbox": None,
            "ext_bbox": None,
            "local": ["image"],
        },
        sort_keys=True,
    )


def _write_v1(path: Path) -> None:
    """A version-1 journal with a job in each phase a batch leaves behind, rows as v1 wrote."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL").fetchall()
        db.executescript(_V1)
        now = _ts(T0)
        rows = [
            ("new", "new", None, None, None, None, None),
            ("open", "intent", None, _ts(T0), None, None, None),
            ("running", "submitted", "t-run", _ts(T0), "RUNNING", None, None),
            ("saved", "done", "t-done", _ts(T0), "SUCCEEDED", 4.0, "/o/saved.mp4"),
            ("lost", "expired", "t-exp", _ts(T0), "SUCCEEDED", 3.0, None),
        ]
        for key, phase, task, intent, status, billed, out in rows:
            db.execute(
                "INSERT INTO jobs (key, name, job, phase, intent_at, task_status, billed_seconds,"
                " path, attempts, error, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    key,
                    _job_json(key),
                    phase,
                    intent,
                    status,
                    billed,
                    out,
                    1 if intent else 0,
                    json.dumps({"kind": "ResultExpiredError", "message": "gone"})
                    if phase == "expired"
                    else None,
                    now,
                    now,
                ),
            )
            if task is not None:
                # As v1 did: the task id in its own UPDATE, which fills the history.
                db.execute(
                    "UPDATE jobs SET task_id = ?, submitted_at = ? WHERE key = ?", (task, now, key)
                )
        db.execute(
            "INSERT INTO detections VALUES ('img', '1:1', ?, ?)",
            (json.dumps(_DETECTION.to_json()), now),
        )
        db.execute(
            "INSERT INTO uploads VALUES ('d', 'emo-v1', 'oss://b/x.png', ?, ?)",
            (_ts(T0 + dt.timedelta(hours=48)), now),
        )
    finally:
        db.close()


def _meta_version(path: Path) -> str:
    db = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
    try:
        return str(db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0])
    finally:
        db.close()


class TestMigration:
    """A version-1 file is read as it is and upgraded on opening, losing nothing."""

    async def test_version_1_is_upgraded_and_keeps_every_row(self, tmp_path: Path) -> None:
        path = tmp_path / "old.sqlite3"
        _write_v1(path)
        async with open_journal(path) as journal:
            assert journal.opened_version == 1
            phases = {r.key: (r.phase, r.task_id) async for r in journal.records()}
            assert phases == {
                "new": (JobPhase.NEW, None),
                "open": (JobPhase.INTENT, None),
                "running": (JobPhase.SUBMITTED, "t-run"),
                "saved": (JobPhase.DONE, "t-done"),
                "lost": (JobPhase.EXPIRED, "t-exp"),
            }
            assert await journal.known_task_ids() == {"t-run", "t-done", "t-exp"}
            assert await journal.get_detection("img", "1:1") == _DETECTION
            later = T0 + dt.timedelta(hours=1)
            assert await journal.get_upload("d", "emo-v1", now=later) == "oss://b/x.png"
            summary = await journal.summary(now=T0)
            assert (summary.total, summary.billed_seconds) == (5, 7.0)
            # What version 2 added works on the upgraded file.
            await journal.record_unresolved(
                "open", reason="answer lost", candidates=[Candidate(task_id="t-new")]
            )
            assert [c.task_id for c in await journal.candidates("open")] == ["t-new"]
            rec = await journal.get("open")
            assert rec is not None
            assert (rec.phase, rec.intent_at, rec.reason) == ("unresolved", T0, "answer lost")
            # And the expired job written by v1 is not sent again unasked.
            with pytest.raises(JournalError, match="expired"):
                await journal.record_intent("lost", at=later)
        assert _meta_version(path) == str(SCHEMA_VERSION)
        async with open_journal(path) as journal:
            assert journal.opened_version == SCHEMA_VERSION
            assert [r.key for r in await journal.unresolved()] == ["open"]

    async def test_status_reads_a_version_1_file_without_changing_it(self, tmp_path: Path) -> None:
        path = tmp_path / "old.sqlite3"
        _write_v1(path)
        before = path.read_bytes()
        summary = await read_summary(path, now=T0)
        assert summary.total == 5
        assert summary.by_phase["unresolved"] == 0
        assert summary.unresolved == ()
        assert [name for name, _ in summary.failures] == ["lost"]
        assert summary.failures[0][1] == ErrorInfo("ResultExpiredError", "gone")
        assert path.read_bytes() == before
        assert _meta_version(path) == "1"

    async def test_a_new_file_equals_an_upgraded_one(self, tmp_path: Path) -> None:
        old, new = tmp_path / "old.sqlite3", tmp_path / "new.sqlite3"
        _write_v1(old)
        async with open_journal(old):
            pass
        async with open_journal(new) as journal:
            assert journal.opened_version == 0
            await journal.register("k", Job("a.png", "b.wav"))

        def schema(path: Path) -> list[tuple[str, str]]:
            db = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
            try:
                return sorted(
                    (str(name), " ".join(str(sql).split()))
                    for name, sql in db.execute(
                        "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL"
                    )
                )
            finally:
                db.close()

        assert schema(old) == schema(new)
        assert _meta_version(old) == _meta_version(new) == str(SCHEMA_VERSION)

    async def test_a_failed_upgrade_leaves_the_file_at_its_version(self, tmp_path: Path) -> None:
        path = tmp_path / "old.sqlite3"
        _write_v1(path)
        # A v1 file someone already gave a "candidates" table of their own: the migration
        # cannot create it, and must not leave half an upgrade behind.
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE candidates (x)")
        db.commit()
        db.close()
        with pytest.raises(JournalError, match=r"cannot upgrade .* to version 2: table candidates"):
            async with open_journal(path):
                pass
        assert _meta_version(path) == "1"
        db = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
        try:
            columns = [str(row[1]) for row in db.execute("PRAGMA table_info(jobs)")]
        finally:
            db.close()
        assert "reason" not in columns
        assert (await read_summary(path, now=T0)).total == 5
