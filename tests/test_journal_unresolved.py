"""Unresolved jobs, their candidate tasks, and expired jobs that stay expired (real files)."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from emo_async._exceptions import JournalError
from emo_async._journal import (
    Candidate,
    JobPhase,
    Journal,
    JournalStore,
    open_journal,
    read_summary,
)
from emo_async._models import ErrorInfo, Job

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)


def _job(name: str) -> Job:
    return Job(Path("/data/portrait.png"), "https://example.com/voice.wav", name=name)


def _cand(task_id: str, minutes: int = 0, **kw: object) -> Candidate:
    return Candidate(
        task_id=task_id,
        created_at=T0 + dt.timedelta(minutes=minutes),
        status="SUCCEEDED",
        video_duration=3.9,
        video_url=f"https://oss.example/{task_id}.mp4",
        url_deadline=T0 + dt.timedelta(hours=24),
        **kw,  # type: ignore[arg-type]
    )


async def _unresolved(journal: Journal, key: str, *candidates: Candidate) -> None:
    await journal.register(key, _job(key))
    await journal.record_intent(key, at=T0)
    await journal.record_unresolved(key, reason="answer lost", candidates=candidates)


def _candidate_rows(path: Path) -> list[tuple[str, str]]:
    """(key, task_id) of every candidate row, as a fresh connection reads the file."""
    db = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
    try:
        return sorted(db.execute("SELECT key, task_id FROM candidates").fetchall())
    finally:
        db.close()


class TestUnresolved:
    """An unresolved job may have been billed: it is kept open and never sent again unproven."""

    async def test_intent_becomes_unresolved_keeping_its_intent_time(self, tmp_path: Path) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            await _unresolved(journal, "k", _cand("t-a"), _cand("t-b", 1))
        # Durable: a fresh open sees it all.
        async with open_journal(path) as journal:
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.intent_at, rec.reason) == ("unresolved", T0, "answer lost")
            assert not rec.phase.is_terminal
            assert [r.key for r in await journal.unfinished()] == ["k"]
            assert [r.key for r in await journal.unresolved()] == ["k"]
            assert await journal.candidates("k") == [_cand("t-a"), _cand("t-b", 1)]

    async def test_nothing_sends_or_ends_it_by_accident(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await _unresolved(journal, "k", _cand("t-a"))
            with pytest.raises(JournalError, match=r"unresolved.*may have been billed"):
                await journal.record_intent("k", at=T0)
            for phase in (JobPhase.FAILED, JobPhase.CANCELLED):
                with pytest.raises(JournalError, match="cannot be marked"):
                    await journal.record_terminal("k", phase, error=ErrorInfo("X", "y"))
            with pytest.raises(JournalError, match="no task"):
                await journal.record_status("k", "RUNNING")
            with pytest.raises(JournalError, match="cannot be marked finished"):
                await journal.record_finished(
                    "k", video_url="u", url_deadline=None, billed_seconds=1
                )
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.attempts, rec.error) == ("unresolved", 1, None)
            assert [c.task_id for c in await journal.candidates("k")] == ["t-a"]

    async def test_only_an_intent_or_an_unresolved_job_becomes_unresolved(
        self, tmp_path: Path
    ) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("new", _job("new"))
            await journal.register("sub", _job("sub"))
            await journal.record_submitted("sub", "t-sub", at=T0)
            for key in ("new", "sub"):
                with pytest.raises(JournalError, match="only an intent"):
                    await journal.record_unresolved(key, reason="r", candidates=[_cand("t-x")])
            with pytest.raises(JournalError, match="no job with key"):
                await journal.record_unresolved("nope", reason="r", candidates=[])
            assert await journal.candidates() == []
            assert (await journal.get("new")).phase is JobPhase.NEW  # type: ignore[union-attr]

    async def test_a_later_look_replaces_the_candidates_and_keeps_saved_files(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "j.sqlite3"
        saved = str(tmp_path / ".unattributed" / "t-a.mp4")
        async with open_journal(path) as journal:
            await _unresolved(journal, "k", _cand("t-a"), _cand("t-b", 1))
            await journal.record_candidate_file("t-a", path=saved, size=123, sha256="ab" * 32)
            # The second look no longer lists t-b, lists t-c, and does not know t-a's file.
            await journal.record_unresolved(
                "k", reason="still unknown", candidates=[_cand("t-a"), _cand("t-c", 2)]
            )
            got = await journal.candidates("k")
            assert [c.task_id for c in got] == ["t-a", "t-c"]
            assert (got[0].path, got[0].size, got[0].sha256) == (saved, 123, "ab" * 32)
            assert got[1].path is None
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.reason, rec.intent_at) == ("still unknown", T0)
        assert _candidate_rows(path) == [("k", "t-a"), ("k", "t-c")]

    async def test_a_task_some_job_owns_is_nobodys_candidate(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("owner", _job("owner"))
            await journal.record_submitted("owner", "t-own", at=T0)
            await _unresolved(journal, "k", _cand("t-a"))
            with pytest.raises(JournalError, match="t-own is job owner's task"):
                await journal.record_unresolved(
                    "k", reason="again", candidates=[_cand("t-b"), _cand("t-own")]
                )
            # Refused whole: the old candidates and reason stand.
            assert [c.task_id for c in await journal.candidates("k")] == ["t-a"]
            assert (await journal.get("k")).reason == "answer lost"  # type: ignore[union-attr]

    async def test_known_task_ids_are_owned_tasks_never_candidates(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("owner", _job("owner"))
            await journal.record_submitted("owner", "t-own", at=T0)
            await _unresolved(journal, "k", _cand("t-a"), _cand("t-b", 1))
            assert await journal.known_task_ids() == {"t-own"}
            await journal.record_submitted("k", "t-b", at=T0)
            assert await journal.known_task_ids() == {"t-own", "t-b"}

    async def test_adopting_a_candidate_settles_the_job_and_frees_the_others(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            # Overlapping windows: t-b is a candidate of both jobs.
            await _unresolved(journal, "k1", _cand("t-a"), _cand("t-b", 1))
            await _unresolved(journal, "k2", _cand("t-b", 1), _cand("t-c", 2))
            assert [c.task_id for c in await journal.candidates()] == ["t-a", "t-b", "t-c"]
            await journal.record_submitted("k1", "t-b", at=T0)
            rec = await journal.get("k1")
            assert rec is not None
            assert (rec.phase, rec.task_id, rec.reason) == ("submitted", "t-b", None)
            assert await journal.candidates("k1") == []
            # t-b is k1's now: k2 keeps only t-c and stays unresolved.
            assert [c.task_id for c in await journal.candidates("k2")] == ["t-c"]
            assert [r.key for r in await journal.unresolved()] == ["k2"]
        assert _candidate_rows(path) == [("k2", "t-c")]

    async def test_proof_of_absence_reopens_it_as_new(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await _unresolved(journal, "k", _cand("t-a"))
            await journal.clear_intent("k")
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.intent_at, rec.reason) == ("new", None, None)
            assert await journal.candidates("k") == []
            await journal.record_intent("k", at=T0 + dt.timedelta(minutes=5))
            assert (await journal.get("k")).attempts == 2  # type: ignore[union-attr]

    async def test_candidate_file_is_recorded_for_every_job_listing_the_task(
        self, tmp_path: Path
    ) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await _unresolved(journal, "k1", _cand("t-a"))
            await _unresolved(journal, "k2", _cand("t-a"))
            target = tmp_path / ".unattributed" / "t-a.mp4"
            await journal.record_candidate_file("t-a", path=target, size=9, sha256="cd" * 32)
            for key in ("k1", "k2"):
                [c] = await journal.candidates(key)
                assert (c.path, c.size, c.sha256) == (str(target), 9, "cd" * 32)
            with pytest.raises(JournalError, match="no unresolved job's candidate"):
                await journal.record_candidate_file("t-zz", path="x", size=1, sha256="s")


class TestManualResolution:
    """assign and release settle what no run could."""

    async def test_assign_makes_the_job_submitted_and_returns_the_saved_file(
        self, tmp_path: Path
    ) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await _unresolved(journal, "k1", _cand("t-a"), _cand("t-b", 1))
            await _unresolved(journal, "k2", _cand("t-b", 1))
            await journal.record_candidate_file(
                "t-b", path="/o/.unattributed/t-b.mp4", size=5, sha256="ef" * 32
            )
            got = await journal.assign("t-b", "k1")
            assert got is not None
            assert (got.task_id, got.path, got.video_duration) == (
                "t-b",
                "/o/.unattributed/t-b.mp4",
                3.9,
            )
            rec = await journal.get("k1")
            assert rec is not None
            assert (rec.phase, rec.task_id, rec.submitted_at) == (
                "submitted",
                "t-b",
                T0 + dt.timedelta(minutes=1),
            )
            assert await journal.candidates("k1") == []
            assert await journal.candidates("k2") == []
            assert (await journal.get("k2")).phase is JobPhase.UNRESOLVED  # type: ignore[union-attr]
            assert "t-b" in await journal.known_task_ids()
            # Again: a no-op; to another job: refused, the task is k1's.
            assert await journal.assign("t-b", "k1") is None
            with pytest.raises(JournalError, match="already job k1's"):
                await journal.assign("t-b", "k2")

    async def test_assign_refuses_a_job_with_another_task_or_a_video(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await journal.register("k", _job("k"))
            await journal.record_submitted("k", "t-1", at=T0)
            with pytest.raises(JournalError, match="only an unresolved job or an open intent"):
                await journal.assign("t-2", "k")
            assert (await journal.get("k")).task_id == "t-1"  # type: ignore[union-attr]
            assert await journal.known_task_ids() == {"t-1"}

    async def test_release_drops_the_task_everywhere_and_the_jobs_stay_unresolved(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            await _unresolved(journal, "k1", _cand("t-a"), _cand("t-b", 1))
            await _unresolved(journal, "k2", _cand("t-b", 1))
            assert await journal.release("t-b") == ["k1", "k2"]
            assert await journal.release("t-b") == []
            assert [c.task_id for c in await journal.candidates("k1")] == ["t-a"]
            assert await journal.candidates("k2") == []
            assert [r.key for r in await journal.unresolved()] == ["k1", "k2"]
            assert "t-b" not in await journal.known_task_ids()
        assert _candidate_rows(path) == [("k1", "t-a")]


class TestSummary:
    """emo-async status shows each unresolved job with its candidates."""

    async def test_counts_and_lists_unresolved_jobs(self, tmp_path: Path) -> None:
        path = tmp_path / ".emo-journal.sqlite3"
        async with open_journal(path) as journal:
            await journal.register("a", _job("lesson-01"))
            await journal.register("b", _job("lesson-03"))
            await journal.record_intent("b", at=T0)
            await journal.record_unresolved(
                "b",
                reason="answer lost at 2026-03-04 05:06:07 UTC",
                candidates=[_cand("t-abc"), Candidate(task_id="t-def")],
            )
            await journal.record_candidate_file(
                "t-abc", path=tmp_path / ".unattributed" / "t-abc.mp4", size=1, sha256="s"
            )
            await journal.register("c", _job("lesson-04"))
            await journal.record_intent("c", at=T0)
            await journal.record_unresolved("c", reason="", candidates=[])
            live = await journal.summary(now=T0)
        offline = await read_summary(path, now=T0)
        for summary in (live, offline):
            assert summary.by_phase["unresolved"] == 2
            assert [(u.name, len(u.candidates)) for u in summary.unresolved] == [
                ("lesson-03", 2),
                ("lesson-04", 0),
            ]
            text = summary.render()
            assert "unresolved 2" in text
            assert (
                "  lesson-03: unresolved (answer lost at 2026-03-04 05:06:07 UTC); candidates:"
                " t-abc (3.9 s, SUCCEEDED, saved .unattributed/t-abc.mp4),"
                " t-def (? s, status unknown)"
            ) in text.splitlines()
            assert (
                "  lesson-04: unresolved (answer lost at 2026-03-04 05:06:07 UTC);"
                " no candidate task seen"
            ) in text.splitlines()


class TestExpired:
    """A paid video whose URL ran out stays expired until the user asks to pay again."""

    async def _done(self, journal: Journal, key: str, deadline: dt.datetime) -> None:
        await journal.register(key, _job(key))
        await journal.record_intent(key, at=T0)
        await journal.record_submitted(key, f"t-{key}", at=T0)
        await journal.record_finished(key, video_url="u", url_deadline=deadline, billed_seconds=4)
        await journal.record_done(key, path=f"/o/{key}.mp4", size=1, sha256="s")

    async def test_missing_file_with_an_expired_url_stays_expired_across_runs(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "j.sqlite3"
        async with open_journal(path) as journal:
            await self._done(journal, "k", T0)
            later = T0 + dt.timedelta(hours=25)
            assert await journal.record_file_missing("k", now=later) is JobPhase.EXPIRED
        async with open_journal(path) as journal:
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.task_id, rec.billed_seconds) == ("expired", "t-k", 4)
            assert rec.error is not None
            assert rec.error.kind == "ResultExpiredError"
            # A rerun cannot pay for it again without saying so.
            with pytest.raises(JournalError, match=r"expired.*paid for"):
                await journal.record_intent("k", at=later)
            assert (await journal.get("k")).phase is JobPhase.EXPIRED  # type: ignore[union-attr]

    async def test_reset_expired_reopens_it_and_keeps_the_billed_total(
        self, tmp_path: Path
    ) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            await self._done(journal, "k", T0)
            await journal.record_file_missing("k", now=T0 + dt.timedelta(hours=25))
            await journal.reset_expired("k")
            rec = await journal.get("k")
            assert rec is not None
            assert (rec.phase, rec.task_id, rec.error, rec.billed_seconds) == (
                "new",
                None,
                None,
                None,
            )
            assert (await journal.summary(now=T0)).billed_seconds == 4.0
            assert await journal.known_task_ids() == {"t-k"}
            await journal.record_intent("k", at=T0 + dt.timedelta(hours=26))
            assert (await journal.get("k")).attempts == 2  # type: ignore[union-attr]
            with pytest.raises(JournalError, match="not expired"):
                await journal.reset_expired("k")


class TestProtocol:
    """The SQLite journal is a JournalStore: a second backend implements the same."""

    async def test_journal_implements_the_store_protocol(self, tmp_path: Path) -> None:
        async with open_journal(tmp_path / "j.sqlite3") as journal:
            store: JournalStore = journal  # mypy checks the signatures here
            assert isinstance(store, JournalStore)
            await store.register("k", _job("k"))
            assert [r.key for r in await store.unfinished()] == ["k"]
        assert not isinstance(object(), JournalStore)
