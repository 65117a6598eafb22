from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import random
import signal
import sqlite3
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import pytest
from anyio.streams.text import TextReceiveStream
from hypothesis import given
from hypothesis import strategies as st

import emo_async
from emo_async._exceptions import JournalCorruptError, JournalError, JournalLockedError
from emo_async._journal import (
    SCHEMA_VERSION,
    JobPhase,
    Journal,
    JournalSummary,
    job_key,
    open_journal,
    read_summary,
)
from emo_async._models import Detection, ErrorInfo, Job

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
REPO = str(Path(emo_async.__file__).resolve().parent.parent)


def _key(job: Job, image: str = "img", audio: str = "aud", ratio: str = "1:1") -> str:
    return job_key(job, image_digest=image, audio_digest=audio, ratio=ratio)


def _job(name: str = "clip", **kw: object) -> Job:
    return Job(Path("/data/portrait.png"), "https://example.com/voice.wav", name=name, **kw)  # type: ignore[arg-type]


async def _python(script: str, *args: str) -> tuple[int, str, str]:
    """Run a Python snippet in a fresh interpreter; return (code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": REPO}
    done = await anyio.run_process(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=env, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


# --------------------------------------------------------------------------------------------


class TestJobKey:
    """job_key is a stable content hash of what decides the video."""

    def test_is_stable_across_runs(self) -> None:
        job = Job("a.png", "b.wav", name="n", style_level="calm", face_bbox=(1, 2, 3, 4))
        key = job_key(job, image_digest="i" * 64, audio_digest="a" * 64, ratio="3:4")
        # Spelled out: any change to the canonical form would orphan every existing journal.
        canonical = (
            '{"audio":"'
            + "a" * 64
            + '","ext_bbox":null,"face_bbox":[1,2,3,4],"image":"'
            + "i" * 64
            + '","name":"n","ratio":"3:4","style_level":"calm","v":1}'
        )
        assert key == hashlib.sha256(canonical.encode()).hexdigest()

    async def test_is_the_same_in_another_process(self) -> None:
        code, out, err = await _python(
            """
            from emo_async._journal import job_key
            from emo_async._models import Job
            job = Job("a.png", "b.wav", name="n", style_level="calm", face_bbox=(1, 2, 3, 4))
            print(job_key(job, image_digest="i" * 64, audio_digest="a" * 64, ratio="3:4"))
            """
        )
        assert code == 0, err
        job = Job("a.png", "b.wav", name="n", style_level="calm", face_bbox=(1, 2, 3, 4))
        assert out.strip() == job_key(
            job, image_digest="i" * 64, audio_digest="a" * 64, ratio="3:4"
        )

    @pytest.mark.parametrize(
        "change",
        [
            {"image": "other"},
            {"audio": "other"},
            {"ratio": "3:4"},
            {"style_level": "active"},
            {"face_bbox": (0, 0, 9, 9)},
            {"ext_bbox": (0, 0, 9, 9)},
            {"name": "other"},
        ],
    )
    def test_changes_when_any_field_changes(self, change: dict[str, object]) -> None:
        base: dict[str, object] = {
            "image": "img",
            "audio": "aud",
            "ratio": "1:1",
            "style_level": "normal",
            "face_bbox": (1, 1, 5, 5),
            "ext_bbox": (0, 0, 8, 8),
            "name": "clip",
        }

        def key(f: dict[str, object]) -> str:
            job = Job(
                "x.png",
                "y.wav",
                name=str(f["name"]),
                style_level=str(f["style_level"]),
                face_bbox=f["face_bbox"],
                ext_bbox=f["ext_bbox"],
            )
            return _key(job, str(f["image"]), str(f["audio"]), str(f["ratio"]))

        assert key(base) != key({**base, **change})

    def test_ignores_where_the_inputs_live(self) -> None:
        a = Job("/one/p.png", "/one/v.wav", name="clip")
        b = Job(Path("/two/q.png"), "https://h/v.wav", name="clip")
        assert _key(a) == _key(b)

    def test_unnamed_job_uses_its_display_name(self) -> None:
        assert _key(Job("p.png", "dir/voice-01.wav")) == _key(
            Job("p.png", "x.wav", name="voice-01")
        )

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["i1", "i2"]),
                st.sampled_from(["a1", "a2"]),
                st.sampled_from(["normal", "calm"]),
                st.sampled_from(["1:1", "3:4"]),
                st.sampled_from([None, (0, 0, 4, 4), (1, 2, 3, 4)]),
                st.sampled_from([None, (0, 0, 8, 8)]),
                st.sampled_from(["a", "b", "ü"]),
            ),
            min_size=2,
            max_size=2,
        )
    )
    def test_keys_equal_iff_canonical_inputs_equal(
        self,
        pair: list[
            tuple[
                str,
                str,
                str,
                str,
                tuple[int, int, int, int] | None,
                tuple[int, int, int, int] | None,
                str,
            ]
        ],
    ) -> None:
        keys = []
        for image, audio, style, ratio, face, ext, name in pair:
            job = Job("p.png", "v.wav", name=name, style_level=style, face_bbox=face, ext_bbox=ext)
            keys.append(_key(job, image, audio, ratio))
        assert (keys[0] == keys[1]) == (pair[0] == pair[1])


# --------------------------------------------------------------------------------------------


class TestRecords:
    """Every record type round-trips and transitions are guarded."""

    async def test_register_round_trips_the_job(self, tmp_path: Path) -> None:
        job = Job(
            Path("/data/p.png"),
            "oss://bucket/v.wav",
            name="clip",
            style_level="active",
            ratio="3:4",
            face_bbox=(1, 2, 3, 4),
            ext_bbox=(0, 0, 10, 14),
        )
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            rec = await journal.register("k1", job)
            assert rec.job == job
            assert isinstance(rec.job.image, Path)
            assert isinstance(rec.job.audio, str)
            assert (rec.key, rec.name, rec.phase, rec.attempts) == ("k1", "clip", "new", 0)
            assert rec.task_id is None
            assert rec.error is None
            assert rec.updated_at.tzinfo is not None
            assert await journal.get("k1") == rec
            assert await journal.get("nope") is None

    async def test_register_returns_the_existing_record_unchanged(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job("first"))
            await journal.record_intent("k", at=T0)
            again = await journal.register("k", _job("second"))
            assert again.name == "first"
            assert again.phase is JobPhase.INTENT

    async def test_lifecycle_to_done_round_trips(self, tmp_path: Path) -> None:
        deadline = T0 + dt.timedelta(hours=24)
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.intent_at, rec.attempts) == ("intent", T0, 1)
            await journal.record_submitted("k", "task-1", at=T0 + dt.timedelta(seconds=1))
            await journal.record_status("k", "RUNNING")
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.task_id, rec.task_status) == ("submitted", "task-1", "RUNNING")
            assert rec.submitted_at == T0 + dt.timedelta(seconds=1)
            await journal.record_finished(
                "k", video_url="https://oss/v.mp4?x=1", url_deadline=deadline, billed_seconds=7.5
            )
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.video_url, rec.url_deadline) == (
                "finished",
                "https://oss/v.mp4?x=1",
                deadline,
            )
            assert (rec.billed_seconds, rec.task_status) == (7.5, "SUCCEEDED")
            await journal.record_done("k", path="/out/clip.mp4", size=1234, sha256="ab" * 32)
            rec = await journal.get("k")
        assert rec is not None
        assert rec.phase is JobPhase.DONE
        assert rec.phase.is_terminal
        assert (rec.path, rec.size, rec.sha256) == ("/out/clip.mp4", 1234, "ab" * 32)
        assert rec.billed_seconds == 7.5  # kept when record_done is given none

    async def test_terminal_records_keep_error_and_billed_seconds(self, tmp_path: Path) -> None:
        error = ErrorInfo("InvalidFileContentError", "no person", code="InvalidFile.Content")
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            for phase in ("failed", "rejected", "expired", "cancelled"):
                await journal.register(phase, _job(phase))
                await journal.record_terminal(
                    phase, JobPhase(phase), error=error, billed_seconds=2.0
                )
                rec = await journal.get(phase)
                assert rec is not None
                assert (rec.phase, rec.error, rec.billed_seconds) == (phase, error, 2.0)
                assert rec.phase.is_terminal
            with pytest.raises(ValueError, match="record_terminal"):
                await journal.record_terminal("failed", JobPhase.DONE)

    async def test_naive_times_are_refused(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job())
            with pytest.raises(ValueError, match="timezone-aware"):
                await journal.record_intent("k", at=dt.datetime(2030, 1, 1))

    async def test_times_are_stored_as_utc(self, tmp_path: Path) -> None:
        cet = dt.timezone(dt.timedelta(hours=1))
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0.astimezone(cet))
            rec = await journal.get("k")
        assert rec is not None
        assert rec.intent_at == T0
        assert rec.intent_at.utcoffset() == dt.timedelta(0)

    @pytest.mark.parametrize(
        "call",
        [
            lambda j: j.record_intent("x", at=T0),
            lambda j: j.record_submitted("x", "t", at=T0),
            lambda j: j.record_status("x", "RUNNING"),
            lambda j: j.record_finished("x", video_url="u", url_deadline=None, billed_seconds=None),
            lambda j: j.record_done("x", path="p", size=1, sha256="s"),
            lambda j: j.record_terminal("x", JobPhase.FAILED),
            lambda j: j.clear_intent("x"),
            lambda j: j.record_file_missing("x"),
        ],
    )
    async def test_unknown_key_raises(
        self, tmp_path: Path, call: Callable[[Journal], object]
    ) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            with pytest.raises(JournalError, match="no job with key x"):
                await call(journal)  # type: ignore[misc]

    async def test_done_never_moves_back(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job())
            await journal.record_submitted("k", "t1", at=T0)
            await journal.record_done("k", path="/o.mp4", size=1, sha256="s")
            with pytest.raises(JournalError, match="second intent"):
                await journal.record_intent("k", at=T0)
            with pytest.raises(JournalError, match="cannot be marked finished"):
                await journal.record_finished(
                    "k", video_url="u", url_deadline=None, billed_seconds=None
                )
            with pytest.raises(JournalError, match="cannot be marked failed"):
                await journal.record_terminal("k", JobPhase.FAILED)
            with pytest.raises(JournalError, match="only an intent"):
                await journal.clear_intent("k")
            await journal.record_status("k", "RUNNING")  # a late poll answer is ignored
            rec = await journal.get("k")
            assert rec is not None
            assert rec.phase is JobPhase.DONE
            assert rec.path == "/o.mp4"

    async def test_no_second_intent_while_a_task_is_live(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            await journal.record_submitted("k", "t1", at=T0)
            with pytest.raises(JournalError, match="pay twice"):
                await journal.record_intent("k", at=T0)
            await journal.record_finished("k", video_url="u", url_deadline=None, billed_seconds=1)
            with pytest.raises(JournalError, match="pay twice"):
                await journal.record_intent("k", at=T0)

    async def test_resubmit_from_intent_counts_attempts(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            await journal.record_intent("k", at=T0 + dt.timedelta(seconds=5))
            rec = await journal.get("k")
        assert rec is not None
        assert (rec.phase, rec.attempts) == ("intent", 2)
        assert rec.intent_at == T0 + dt.timedelta(seconds=5)

    async def test_clear_intent_returns_to_new(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            await journal.clear_intent("k")
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.intent_at, rec.attempts) == ("new", None, 1)
            await journal.clear_intent("k")  # already new: nothing to do
            await journal.record_intent("k", at=T0)
            await journal.record_submitted("k", "t1", at=T0)
            with pytest.raises(JournalError, match="only an intent"):
                await journal.clear_intent("k")

    async def test_submitted_is_idempotent_and_exclusive(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("a", _job("a"))
            await journal.register("b", _job("b"))
            await journal.record_submitted("a", "t1", at=T0)  # adoption straight from new
            await journal.record_submitted("a", "t1", at=T0)
            with pytest.raises(JournalError, match="refusing to record task t2"):
                await journal.record_submitted("a", "t2", at=T0)
            with pytest.raises(JournalError, match="already recorded for job a"):
                await journal.record_submitted("b", "t1", at=T0)
            rec = await journal.get("b")
            assert rec is not None
            assert rec.phase is JobPhase.NEW

    async def test_status_needs_a_task(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            with pytest.raises(JournalError, match="no task"):
                await journal.record_status("k", "RUNNING")
            with pytest.raises(JournalError, match="cannot be marked done"):
                await journal.record_done("k", path="p", size=1, sha256="s")

    async def test_retry_after_expiry_needs_a_reset_and_starts_a_fresh_attempt(
        self, tmp_path: Path
    ) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            await journal.record_submitted("k", "t1", at=T0)
            await journal.record_terminal(
                "k",
                JobPhase.EXPIRED,
                error=ErrorInfo("ResultExpiredError", "gone"),
                billed_seconds=4,
            )
            # That video was paid for: no new attempt unless the user asked to pay again.
            with pytest.raises(JournalError, match=r"expired.*reset_expired"):
                await journal.record_intent("k", at=T0 + dt.timedelta(hours=1))
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.attempts, rec.task_id) == ("expired", 1, "t1")
            await journal.reset_expired("k")
            await journal.record_intent("k", at=T0 + dt.timedelta(hours=1))
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.attempts, rec.task_id, rec.error) == ("intent", 2, None, None)
            assert rec.billed_seconds is None
            await journal.record_submitted("k", "t2", at=T0)
            assert await journal.known_task_ids() == {"t1", "t2"}
            # The first attempt's seconds were paid for: they stay in the total.
            await journal.record_finished("k", video_url="u", url_deadline=None, billed_seconds=3)
            assert (await journal.summary(now=T0)).billed_seconds == 7.0

    async def test_missing_file_goes_back_to_finished_while_the_url_works(
        self, tmp_path: Path
    ) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            for key, deadline in (("fresh", T0 + dt.timedelta(hours=3)), ("stale", T0)):
                await journal.register(key, _job(key))
                await journal.record_submitted(key, f"t-{key}", at=T0)
                await journal.record_finished(
                    key, video_url="u", url_deadline=deadline, billed_seconds=1
                )
                await journal.record_done(key, path="/o.mp4", size=1, sha256="s")
            now = T0 + dt.timedelta(hours=1)
            assert await journal.record_file_missing("fresh", now=now) is JobPhase.FINISHED
            assert await journal.record_file_missing("stale", now=now) is JobPhase.EXPIRED
            stale = await journal.get("stale")
            assert stale is not None
            assert stale.error is not None
            assert stale.path is None
            with pytest.raises(JournalError, match="not done"):
                await journal.record_file_missing("stale")

    async def test_unfinished_lists_every_open_phase(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            for key in ("new", "intent", "submitted", "finished", "done", "failed"):
                await journal.register(key, _job(key))
            await journal.record_intent("intent", at=T0)
            await journal.record_submitted("submitted", "t1", at=T0)
            await journal.record_submitted("finished", "t2", at=T0)
            await journal.record_finished(
                "finished", video_url="u", url_deadline=None, billed_seconds=1
            )
            await journal.record_submitted("done", "t3", at=T0)
            await journal.record_done("done", path="p", size=1, sha256="s")
            await journal.record_terminal("failed", JobPhase.FAILED)
            keys = [r.key for r in await journal.unfinished()]
            assert keys == ["new", "intent", "submitted", "finished"]
            assert await journal.known_task_ids() == {"t1", "t2", "t3"}

    async def test_survives_close_and_reopen(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            await journal.register("k", _job())
            await journal.record_submitted("k", "t1", at=T0)
            before = await journal.get("k")
            await journal.put_detection("img", "1:1", Detection(True, (1, 2, 3, 4), (0, 0, 9, 9)))
        async with open_journal(path) as journal:
            assert await journal.get("k") == before
            assert await journal.get_detection("img", "1:1") is not None

    async def test_is_wal_with_full_sync(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            # The pragma is per connection: ask the journal's own.
            level = await journal._db().read(
                lambda db: db.execute("PRAGMA synchronous").fetchone()[0]
            )
            assert level == 2  # FULL
        header = await anyio.Path(path).read_bytes()
        assert header[18:20] == b"\x02\x02"  # WAL, persisted in the file header

    async def test_closed_journal_refuses_use(self, tmp_path: Path) -> None:
        journal = await Journal.open(tmp_path / "j.sqlite3")
        await journal.aclose()
        await journal.aclose()
        with pytest.raises(JournalError, match="closed"):
            await journal.get("k")
        assert "closed" in repr(journal)

    async def test_records_streams_5000_rows_in_order(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            added = await journal.register_many((f"k{i:05d}", _job(f"c{i}")) for i in range(5000))
            assert added == 5000
            assert await journal.register_many([("k00000", _job("c0"))]) == 0
            seen = [rec.key async for rec in journal.records()]
        assert seen == [f"k{i:05d}" for i in range(5000)]

    async def test_cancelled_write_still_commits(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            await journal.register("k", _job())
            with anyio.CancelScope() as scope:
                scope.cancel()
                await journal.record_intent("k", at=T0)
            rec = await journal.get("k")
        assert rec is not None
        assert rec.phase is JobPhase.INTENT


class TestCaches:
    """Detections and upload URLs are cached with their validity."""

    async def test_detection_round_trips(self, tmp_path: Path) -> None:
        det = Detection(True, (10, 20, 30, 40), (0, 0, 100, 137), ratio="3:4", request_id="r1")
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            assert await journal.get_detection("img", "3:4") is None
            await journal.put_detection("img", "3:4", det)
            assert await journal.get_detection("img", "3:4") == det
            assert await journal.get_detection("img", "1:1") is None
            rejected = Detection(False, message="no face", ratio="3:4")
            await journal.put_detection("img", "3:4", rejected)
            assert await journal.get_detection("img", "3:4") == rejected

    async def test_upload_url_is_returned_only_while_valid_for_an_hour(
        self, tmp_path: Path
    ) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            assert await journal.get_upload("d", "emo-v1", now=T0) is None
            await journal.put_upload(
                "d", "emo-v1", "oss://b/x.png", expires_at=T0 + dt.timedelta(hours=48)
            )
            assert await journal.get_upload("d", "emo-v1", now=T0) == "oss://b/x.png"
            assert await journal.get_upload("d", "emo-detect-v1", now=T0) is None
            later = T0 + dt.timedelta(hours=47, minutes=1)
            assert await journal.get_upload("d", "emo-v1", now=later) is None
            expired = T0 + dt.timedelta(hours=49)
            assert await journal.get_upload("d", "emo-v1", now=expired) is None
            await journal.put_upload(
                "d", "emo-v1", "oss://b/y.png", expires_at=expired + dt.timedelta(hours=2)
            )
            assert await journal.get_upload("d", "emo-v1", now=expired) == "oss://b/y.png"


# --------------------------------------------------------------------------------------------

_HOLD = """
import sys, anyio
from emo_async._journal import open_journal
async def main():
    async with open_journal(sys.argv[1]):
        print("ready", flush=True)
        await anyio.sleep(120)
anyio.run(main)
"""

_TRY_OPEN = """
import sys, anyio
from emo_async._journal import open_journal
async def main():
    try:
        async with open_journal(sys.argv[1]):
            print("opened")
    except Exception as exc:
        print(type(exc).__name__, exc)
anyio.run(main)
"""


class TestLock:
    """One process at a time; the lock dies with its holder."""

    async def test_second_open_in_this_process_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path):
            with pytest.raises(JournalLockedError, match="in use by this process") as info:
                async with open_journal(path):
                    pass
            assert str(path) in str(info.value)

    async def test_lock_is_released_on_close(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        journal = await Journal.open(path)
        try:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            # Held: neither this process nor another gets in.
            with pytest.raises(JournalLockedError):
                await Journal.open(path)
            code, out, err = await _python(_TRY_OPEN, str(path))
            assert code == 0, err
            assert out.startswith("JournalLockedError"), out
        finally:
            await journal.aclose()
        await journal.aclose()  # twice is fine
        # Released: another process opens it, and so does this one, with the data intact.
        code, out, err = await _python(_TRY_OPEN, str(path))
        assert (code, out.strip()) == (0, "opened"), err
        async with open_journal(path) as again:
            rec = await again.get("k")
            assert rec is not None
            assert rec.phase is JobPhase.INTENT

    async def test_lock_file_symlink_is_not_followed(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        precious = tmp_path / "precious.txt"
        precious.write_text("not yours\n")
        lock = tmp_path / "j.sqlite3.lock"
        lock.symlink_to(precious)
        with pytest.raises(JournalError, match="is a symlink; refusing to follow it"):
            await Journal.open(path)
        # The target is untouched (not truncated, no pid written) and the link still a link.
        assert precious.read_text() == "not yours\n"
        assert lock.is_symlink()
        assert not path.exists()
        # A dangling link would be created through by O_CREAT: refused the same way.
        lock.unlink()
        elsewhere = tmp_path / "elsewhere.lock"
        lock.symlink_to(elsewhere)
        with pytest.raises(JournalError, match="symlink"):
            await Journal.open(path)
        assert not elsewhere.exists()

    async def test_lock_file_that_is_not_a_regular_file_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        os.mkfifo(tmp_path / "j.sqlite3.lock")
        with pytest.raises(JournalError, match="not a regular file"):
            await Journal.open(path)
        assert not path.exists()

    async def test_hard_linked_lock_file_is_locked_but_not_rewritten(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        other = tmp_path / "other.txt"
        other.write_text("shared content\n")
        os.link(other, tmp_path / "j.sqlite3.lock")
        async with open_journal(path) as journal:
            await journal.register("k", _job())
            with pytest.raises(JournalLockedError):
                await Journal.open(path)
        assert other.read_text() == "shared content\n"

    async def test_second_open_in_another_process_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path):
            code, out, err = await _python(_TRY_OPEN, str(path))
        assert code == 0, err
        assert out.startswith("JournalLockedError"), out
        assert str(path) in out
        assert f"pid {os.getpid()}" in out

    async def test_lock_is_released_when_the_holder_is_killed(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        env = {**os.environ, "PYTHONPATH": REPO}
        proc = await anyio.open_process(
            [sys.executable, "-c", _HOLD, str(path)], env=env, stderr=None
        )
        try:
            assert proc.stdout is not None
            line = ""
            async for chunk in TextReceiveStream(proc.stdout):
                line += chunk
                if "\n" in line:
                    break
            assert line.strip() == "ready"
            with pytest.raises(JournalLockedError, match=f"pid {proc.pid}"):
                async with open_journal(path):
                    pass
            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.aclose()
        async with open_journal(path) as journal:
            await journal.register("k", _job())


def _text_file(path: Path) -> None:
    path.write_text("task_id,status\nabc,SUCCEEDED\n")


def _random_file(path: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(8192))


def _other_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, title TEXT)")
        db.execute("INSERT INTO photos (title) VALUES ('beach')")
    db.close()


def _other_schema(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('schema', 'someone.else'), ('version', '1')")
    db.close()


def _newer_journal(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
        db.execute(
            "INSERT INTO meta VALUES ('schema', 'emo_async.journal'), ('version', ?)",
            (str(SCHEMA_VERSION + 1),),
        )
    db.close()


class TestForeignFiles:
    """A file that is not our journal gives a clear error and is left as it was."""

    @pytest.mark.parametrize(
        ("make", "match"),
        [
            (_text_file, "not an SQLite database"),
            (_random_file, "not an SQLite database"),
            (_other_sqlite, r"not an emo_async journal \(it has tables: photos\)"),
            (_other_schema, "'someone.else'"),
            (_newer_journal, "newer emo_async"),
        ],
    )
    async def test_is_refused_and_left_untouched(
        self, tmp_path: Path, make: Callable[[Path], None], match: str
    ) -> None:
        path = tmp_path / "foreign.db"
        await anyio.to_thread.run_sync(make, path)
        before = await anyio.Path(path).read_bytes()
        with pytest.raises(JournalCorruptError, match=match) as info:
            async with open_journal(path):
                pass
        assert str(path) in str(info.value)
        with pytest.raises(JournalCorruptError, match=match):
            await read_summary(path)
        assert await anyio.Path(path).read_bytes() == before
        # The lock was released: the next error is the same one, not "locked".
        with pytest.raises(JournalCorruptError):
            async with open_journal(path):
                pass

    async def test_damaged_journal_is_reported(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            await journal.register_many((f"k{i}", _job(f"c{i}" * 40)) for i in range(3000))
        data = bytearray(await anyio.Path(path).read_bytes())
        data[8192:40960] = random.Random(3).randbytes(40960 - 8192)
        await anyio.Path(path).write_bytes(bytes(data))
        with pytest.raises(JournalCorruptError, match="damaged"):
            async with open_journal(path):
                pass

    async def test_empty_file_becomes_a_journal(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        await anyio.Path(path).touch()
        async with open_journal(path) as journal:
            await journal.register("k", _job())
        assert (await read_summary(path)).total == 1

    async def test_missing_directories_are_created(self, tmp_path: Path) -> None:
        path = tmp_path / "a" / "b" / ".emo-journal.sqlite3"
        async with open_journal(path) as journal:
            assert journal.path == path
        assert await anyio.Path(path).is_file()

    async def test_directory_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(JournalError, match="is a directory"):
            async with open_journal(tmp_path):
                pass

    async def test_read_summary_of_nothing_is_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(JournalError, match="no journal"):
            await read_summary(tmp_path / "absent.sqlite3")
        assert not await anyio.Path(tmp_path / "absent.sqlite3").exists()


class TestDurability:
    """A committed intent survives the process dying on the spot."""

    async def test_intent_survives_an_immediate_exit(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        code, _, err = await _python(
            """
            import datetime as dt, os, sys, anyio
            from emo_async._journal import Journal
            from emo_async._models import Job
            async def main():
                journal = await Journal.open(sys.argv[1])
                await journal.register("k", Job("p.png", "v.wav", name="clip"))
                await journal.record_intent("k", at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
                os._exit(0)  # no close, no checkpoint, no flush
            anyio.run(main)
            """,
            str(path),
        )
        assert code == 0, err
        async with open_journal(path) as journal:
            rec = await journal.get("k")
        assert rec is not None
        assert (rec.phase, rec.attempts) == ("intent", 1)
        assert rec.intent_at == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


class TestSummary:
    """The summary counts phases, billed seconds, failures and downloads at risk."""

    async def _fill(self, journal: Journal) -> None:
        fail = ErrorInfo("JobFailedError", "task ended FAILED", code="InternalError.Algo")
        plan: list[tuple[str, str]] = [
            ("d1", "done"),
            ("d2", "done"),
            ("f1", "failed"),
            ("r1", "rejected"),
            ("e1", "expired"),
            ("soon", "finished"),
            ("gone", "finished"),
            ("later", "finished"),
            ("s1", "submitted"),
            ("i1", "intent"),
            ("n1", "new"),
        ]
        for key, _ in plan:
            await journal.register(key, _job(key))
        for key, task in (("d1", 5.0), ("d2", 6.0)):
            await journal.record_submitted(key, f"t-{key}", at=T0)
            await journal.record_done(
                key, path=f"/o/{key}.mp4", size=1, sha256="s", billed_seconds=task
            )
        await journal.record_terminal("f1", JobPhase.FAILED, error=fail)
        await journal.record_terminal("r1", JobPhase.REJECTED)
        await journal.record_submitted("e1", "t-e1", at=T0)
        await journal.record_terminal("e1", JobPhase.EXPIRED, billed_seconds=4.0)
        for key, hours in (("soon", 1), ("gone", -1), ("later", 5)):
            await journal.record_submitted(key, f"t-{key}", at=T0)
            await journal.record_finished(
                key, video_url="u", url_deadline=T0 + dt.timedelta(hours=hours), billed_seconds=1.0
            )
        await journal.record_submitted("s1", "t-s1", at=T0)
        await journal.record_intent("i1", at=T0)

    async def test_counts_billed_failures_and_at_risk(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await self._fill(journal)
            summary = await journal.summary(now=T0)
        assert summary.total == 11
        assert dict(summary.by_phase) == {
            "new": 1,
            "intent": 1,
            "unresolved": 0,
            "submitted": 1,
            "finished": 3,
            "done": 2,
            "failed": 1,
            "rejected": 1,
            "expired": 1,
            "cancelled": 0,
        }
        assert summary.billed_seconds == pytest.approx(5 + 6 + 4 + 3)
        assert [name for name, _ in summary.failures] == ["f1", "r1", "e1"]
        assert summary.failures[0][1].code == "InternalError.Algo"
        assert summary.failures[1][1].kind == "rejected"
        assert summary.at_risk == (
            ("gone", T0 - dt.timedelta(hours=1)),
            ("soon", T0 + dt.timedelta(hours=1)),
        )
        text = summary.render()
        assert "11 jobs" in text
        assert "done 2" in text
        assert "18.0 s" in text
        assert "gone: URL expired 1 h 00 min ago" in text
        assert "soon: URL expires in 1 h 00 min" in text
        assert "f1: JobFailedError [InternalError.Algo]: task ended FAILED" in text

    async def test_read_summary_works_while_a_batch_holds_the_lock(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            await self._fill(journal)
            live = await read_summary(path, now=T0)
            assert live == await journal.summary(now=T0)
            await journal.record_done("soon", path="/o/soon.mp4", size=1, sha256="s")
            assert (await read_summary(path, now=T0)).by_phase["done"] == 3
        after = await read_summary(path, now=T0)
        assert isinstance(after, JournalSummary)
        assert after.total == 11

    async def test_empty_journal_renders(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            summary = await journal.summary()
        assert summary.total == 0
        assert summary.billed_seconds == 0
        assert "0 jobs" in summary.render()


class TestEventLoop:
    """Journal I/O runs off the event loop."""

    async def test_loop_keeps_running_while_writes_wait_on_sqlite(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            await journal.register("k", _job())
            await journal.record_submitted("k", "t1", at=T0)

            # Another connection takes SQLite's write lock, so the journal's first write must wait
            # for it. If that wait blocked the loop, the ticker below could never run to release it.
            def hold() -> sqlite3.Connection:
                other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                other.execute("BEGIN IMMEDIATE")
                return other

            other = await anyio.to_thread.run_sync(hold)
            done = 0
            ticks = 0

            async def writer() -> None:
                nonlocal done
                for i in range(200):
                    await journal.record_status("k", f"RUNNING-{i}")
                    done += 1

            async def ticker() -> None:
                nonlocal ticks
                while done < 200:
                    ticks += 1
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                tg.start_soon(ticker)
                while ticks < 100:
                    await anyio.lowlevel.checkpoint()
                done_while_held = done
                ticks_while_held = ticks
                await anyio.to_thread.run_sync(other.rollback)
                await anyio.to_thread.run_sync(other.close)
            rec = await journal.get("k")
        assert done_while_held == 0
        assert ticks_while_held >= 100
        assert done == 200
        assert ticks > ticks_while_held
        assert rec is not None
        assert rec.task_status == "RUNNING-199"


async def _stall(journal: Journal, tg: anyio.abc.TaskGroup) -> threading.Event:
    """Keep the journal's thread busy until the returned event is set: the calls made
    meanwhile queue up, and the thread takes them all as one group."""
    entered, release = threading.Event(), threading.Event()

    def block(db: sqlite3.Connection) -> None:
        entered.set()
        release.wait(30)

    tg.start_soon(journal._db().read, block)
    await anyio.to_thread.run_sync(entered.wait, 30)
    return release


async def _queued(journal: Journal, n: int) -> None:
    """Wait until ``n`` calls are queued for the journal's thread."""
    while journal._db()._queue.qsize() < n:
        await anyio.lowlevel.checkpoint()


def _phases_on_disk(path: Path) -> dict[str, str]:
    """Each job's phase as a fresh connection reads it: what is committed, nothing else."""
    with sqlite3.connect(path.as_uri() + "?mode=ro", uri=True) as db:
        rows = db.execute("SELECT key, phase FROM jobs").fetchall()
    db.close()
    return {str(k): str(p) for k, p in rows}


class TestGroupCommit:
    """Writes queued together share one commit; each caller resumes once its write is in."""

    async def test_queued_writes_share_a_commit_and_a_refused_one_undoes_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from emo_async import _journal

        groups: list[int] = []
        real = _journal._Connection._run_group

        def run_group(self: _journal._Connection, group: list[_journal._Call]) -> None:
            groups.append(sum(call.kind == _journal._WRITE for call in group))
            real(self, group)

        monkeypatch.setattr(_journal._Connection, "_run_group", run_group)
        path = tmp_path / "j.sqlite3"
        keys = [f"k{i}" for i in range(10)]
        async with open_journal(path) as journal:
            for key in [*keys, "owner"]:
                await journal.register(key, _job(key))
            await journal.record_submitted("owner", "t-taken", at=T0)
            results: dict[str, BaseException | None] = {}

            async def submit(key: str, task_id: str) -> None:
                try:
                    await journal.record_submitted(key, task_id, at=T0)
                    results[key] = None
                except JournalError as exc:
                    results[key] = exc

            async with anyio.create_task_group() as tg:
                release = await _stall(journal, tg)
                for key in keys[:-1]:
                    tg.start_soon(submit, key, f"t-{key}")
                # Refused: the task is already recorded for "owner".
                tg.start_soon(submit, keys[-1], "t-taken")
                await _queued(journal, len(keys))
                assert results == {}
                release.set()
        assert len(keys) in groups  # one transaction for the ten of them
        assert all(results[key] is None for key in keys[:-1])
        assert "already recorded for job owner" in str(results[keys[-1]])
        on_disk = _phases_on_disk(path)
        assert {key: on_disk[key] for key in keys} == {
            **{key: "submitted" for key in keys[:-1]},
            keys[-1]: "new",
        }

    async def test_deferred_rows_of_a_failed_write_are_kept_for_the_next_one(
        self, tmp_path: Path
    ) -> None:
        # A full database fails the intent that carries 50 deferred job rows: the rows must
        # not vanish while their keys stay known, or each later intent would fail with "no
        # job with key" instead of succeeding once there is room again.
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            await journal.register("first", _job("first"))
            await journal.record_intent("first", at=T0)
            conn = journal._conn
            assert conn is not None
            pages = await conn.alone(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
            await conn.alone(lambda db: db.execute(f"PRAGMA max_page_count = {pages}").fetchone())
            keys = [f"new{i}" for i in range(50)]
            for key in keys:
                await journal.register(key, _job(key * 40))
            with pytest.raises(JournalError, match="full"):
                await journal.record_intent(keys[0], at=T0)
            await conn.alone(lambda db: db.execute("PRAGMA max_page_count = 1000000").fetchone())
            for key in keys:
                await journal.record_intent(key, at=T0)
        on_disk = _phases_on_disk(path)
        assert {key: on_disk.get(key) for key in keys} == dict.fromkeys(keys, "intent")

    async def test_a_failed_commit_fails_every_write_of_its_group(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        keys = [f"k{i}" for i in range(5)]
        async with open_journal(path) as journal:
            for key in keys:
                await journal.register(key, _job(key))
            await journal.known_task_ids()  # the registrations are committed
            conn = journal._db()
            found_db = conn._db
            assert found_db is not None
            real_db: sqlite3.Connection = found_db

            class FailingCommit:
                """The real connection, except that COMMIT fails (as on a full disk)."""

                in_transaction = property(lambda _: real_db.in_transaction)

                def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
                    if sql == "COMMIT":
                        raise sqlite3.OperationalError("database or disk is full")
                    return real_db.execute(sql, *args)

            errors: list[BaseException] = []

            async def intent(key: str) -> None:
                try:
                    await journal.record_intent(key, at=T0)
                except JournalError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                release = await _stall(journal, tg)
                conn._db = FailingCommit()  # type: ignore[assignment]
                for key in keys:
                    tg.start_soon(intent, key)
                await _queued(journal, len(keys))
                release.set()
            conn._db = real_db
            assert len(errors) == len(keys)
            assert all("disk is full" in str(exc) for exc in errors)
            assert {(await journal.get(key)).phase for key in keys} == {"new"}  # type: ignore[union-attr]
        assert set(_phases_on_disk(path).values()) == {"new"}

    async def test_a_patient_write_returns_committed_and_goes_with_an_urgent_one(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            for key in ("a", "b"):
                await journal.register(key, _job(key))
                await journal.record_submitted(key, f"t-{key}", at=T0)
            # Long enough that only the urgent write below can end the wait in this test.
            journal.commit_delay = 3600.0
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    functools.partial(
                        journal.record_finished,
                        "a",
                        video_url="u",
                        url_deadline=None,
                        billed_seconds=1.0,
                    )
                )
                for _ in range(20):
                    await anyio.lowlevel.checkpoint()
                assert _phases_on_disk(path)["a"] == "submitted"  # still waiting for company
                await journal.record_status("b", "RUNNING")  # may not wait: both go now
            assert _phases_on_disk(path)["a"] == "finished"
            journal.commit_delay = 0.0
            await journal.record_done("a", path="/o/a.mp4", size=1, sha256="s")
            assert _phases_on_disk(path)["a"] == "done"  # committed when it returned

    async def test_deferred_writes_are_kept(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        det = Detection(True, (1, 2, 3, 4), (0, 0, 9, 9))
        async with open_journal(path) as journal:
            rec = await journal.register("k", _job())
            await journal.put_upload(
                "d", "emo-v1", "oss://b/x.png", expires_at=T0 + dt.timedelta(hours=48)
            )
            await journal.put_detection("img", "1:1", det)
            # Known at once in this process...
            assert await journal.get("k") == rec
            assert await journal.get_upload("d", "emo-v1", now=T0) == "oss://b/x.png"
            assert await journal.get_detection("img", "1:1") == det
            await journal.register("later", _job("later"))  # deferred until the close
        async with open_journal(path) as journal:
            # ...and written for the next run.
            assert await journal.get("k") == rec
            assert await journal.get("later") is not None
            assert await journal.get_upload("d", "emo-v1", now=T0) == "oss://b/x.png"
            assert await journal.get_detection("img", "1:1") == det

    async def test_concurrent_intents_survive_an_immediate_exit(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        code, _, err = await _python(
            """
            import datetime as dt, os, sys, anyio
            from emo_async._journal import Journal
            from emo_async._models import Job
            async def main():
                journal = await Journal.open(sys.argv[1])
                journal.commit_delay = 0.1
                at = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
                for i in range(50):  # deferred: written with the intents
                    await journal.register(f"k{i}", Job("p.png", f"v{i}.wav", name=f"c{i}"))
                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(lambda i=i: journal.record_intent(f"k{i}", at=at))
                os._exit(0)  # no close, no checkpoint, no flush
            anyio.run(main)
            """,
            str(path),
        )
        assert code == 0, err
        async with open_journal(path) as journal:
            records = [rec async for rec in journal.records()]
        assert len(records) == 50
        assert {(rec.phase, rec.attempts) for rec in records} == {("intent", 1)}
