"""The PostgreSQL journal against a real server: the SQLite journal's promises on both backends
(one shared set of checks), then what only a shared journal has: claims, leases, the open-task
quota across workers, account-wide task ids and intents, and a server restart mid-use."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import emo_async
from emo_async._exceptions import JournalError
from emo_async._journal import Candidate, JobPhase, Journal, JournalStore
from emo_async._journal.postgres import PostgresJournal
from emo_async._journal.postgres_claims import ClaimLostError
from emo_async._journal.protocol import ClaimingStore
from emo_async._models import Detection, ErrorInfo, Job
from emo_async._pg import PostgresUnavailable, open_pool
from emo_async._pg.testing import TempPostgres

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
ACCOUNT = "acct-fingerprint-1"
REPO = str(Path(emo_async.__file__).resolve().parent.parent)


def _job(name: str = "clip") -> Job:
    return Job(Path("/data/portrait.png"), "https://example.com/voice.wav", name=name)


def _cand(task_id: str, minutes: int = 0) -> Candidate:
    return Candidate(
        task_id=task_id,
        created_at=T0 + dt.timedelta(minutes=minutes),
        status="SUCCEEDED",
        video_duration=3.9,
        video_url=f"https://oss.example/{task_id}.mp4",
        url_deadline=T0 + dt.timedelta(hours=24),
    )


async def _python(script: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": REPO}
    done = await anyio.run_process(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=env, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


class Backend:
    """Opens the same journal again and again: an SQLite file, or a batch in a database."""

    def __init__(self, name: str, opener: Callable[[], Any]) -> None:
        self.name = name
        self._opener = opener

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Any]:
        journal = await self._opener()
        try:
            yield journal
        finally:
            await journal.aclose()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "j.sqlite3"
        return Backend("sqlite", lambda: Journal.open(path))
    dsn = request.getfixturevalue("pg_dsn")
    return Backend("postgres", lambda: PostgresJournal.open(dsn, batch="lessons", account=ACCOUNT))


def _pg(dsn: str, batch: str = "lessons", account: str = ACCOUNT) -> Any:
    return PostgresJournal.open(dsn, batch=batch, account=account)


# ============================================================================================
# The promises of every JournalStore, on both backends.


class TestSharedLifecycle:
    async def test_register_round_trips_and_is_idempotent(self, backend: Backend) -> None:
        job = Job(
            Path("/data/p.png"),
            "oss://bucket/v.wav",
            name="clip",
            style_level="active",
            ratio="3:4",
            face_bbox=(1, 2, 3, 4),
            ext_bbox=(0, 0, 10, 14),
        )
        async with backend.open() as journal:
            rec = await journal.register("k1", job)
            assert rec.job == job
            assert isinstance(rec.job.image, Path)
            assert (rec.key, rec.name, rec.phase, rec.attempts) == ("k1", "clip", "new", 0)
            assert rec.updated_at.tzinfo is not None
            assert await journal.get("k1") == rec
            assert await journal.get("nope") is None
            await journal.record_intent("k1", at=T0)
            again = await journal.register("k1", _job("second"))
            assert (again.name, again.phase) == ("clip", "intent")

    async def test_lifecycle_to_done_round_trips(self, backend: Backend) -> None:
        deadline = T0 + dt.timedelta(hours=24)
        async with backend.open() as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            rec = await journal.get("k")
            assert (rec.phase, rec.intent_at, rec.attempts) == ("intent", T0, 1)
            await journal.record_submitted("k", "task-1", at=T0 + dt.timedelta(seconds=1))
            await journal.record_status("k", "RUNNING")
            rec = await journal.get("k")
            assert (rec.phase, rec.task_id, rec.task_status) == ("submitted", "task-1", "RUNNING")
            assert rec.submitted_at == T0 + dt.timedelta(seconds=1)
            await journal.record_finished(
                "k", video_url="https://oss/v.mp4?x=1", url_deadline=deadline, billed_seconds=7.5
            )
            rec = await journal.get("k")
            assert (rec.phase, rec.video_url, rec.url_deadline, rec.billed_seconds) == (
                "finished",
                "https://oss/v.mp4?x=1",
                deadline,
                7.5,
            )
            await journal.record_done("k", path="/out/clip.mp4", size=1234, sha256="ab" * 32)
        async with backend.open() as journal:  # durable: a fresh open sees it all
            rec = await journal.get("k")
        assert rec.phase is JobPhase.DONE
        assert (rec.path, rec.size, rec.sha256, rec.billed_seconds) == (
            "/out/clip.mp4",
            1234,
            "ab" * 32,
            7.5,
        )

    async def test_terminal_records_keep_error_and_billed_seconds(self, backend: Backend) -> None:
        error = ErrorInfo("InvalidFileContentError", "no person", code="InvalidFile.Content")
        async with backend.open() as journal:
            for phase in ("failed", "rejected", "expired", "cancelled"):
                await journal.register(phase, _job(phase))
                await journal.record_terminal(
                    phase, JobPhase(phase), error=error, billed_seconds=2.0
                )
                rec = await journal.get(phase)
                assert (rec.phase, rec.error, rec.billed_seconds) == (phase, error, 2.0)
            with pytest.raises(ValueError, match="record_terminal"):
                await journal.record_terminal("failed", JobPhase.DONE)

    async def test_times_are_utc_and_naive_ones_refused(self, backend: Backend) -> None:
        cet = dt.timezone(dt.timedelta(hours=1))
        async with backend.open() as journal:
            await journal.register("k", _job())
            with pytest.raises(ValueError, match="timezone-aware"):
                await journal.record_intent("k", at=dt.datetime(2030, 1, 1))
            await journal.record_intent("k", at=T0.astimezone(cet))
            rec = await journal.get("k")
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
            lambda j: j.reset_expired("x"),
        ],
    )
    async def test_unknown_key_raises(self, backend: Backend, call: Callable[[Any], Any]) -> None:
        async with backend.open() as journal:
            with pytest.raises(JournalError, match="no job with key x"):
                await call(journal)

    async def test_done_never_moves_back(self, backend: Backend) -> None:
        async with backend.open() as journal:
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
            assert (rec.phase, rec.path) == ("done", "/o.mp4")

    async def test_intents_attempts_and_clearing(self, backend: Backend) -> None:
        async with backend.open() as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            await journal.record_intent("k", at=T0)  # a deliberate resubmit
            assert (await journal.get("k")).attempts == 2
            await journal.clear_intent("k")
            rec = await journal.get("k")
            assert (rec.phase, rec.intent_at, rec.attempts) == ("new", None, 2)
            await journal.clear_intent("k")  # already new
            await journal.record_intent("k", at=T0)
            await journal.record_submitted("k", "t1", at=T0)
            with pytest.raises(JournalError, match="pay twice"):
                await journal.record_intent("k", at=T0)
            with pytest.raises(JournalError, match="only an intent"):
                await journal.clear_intent("k")
            await journal.record_finished("k", video_url="u", url_deadline=None, billed_seconds=1)
            with pytest.raises(JournalError, match="pay twice"):
                await journal.record_intent("k", at=T0)

    async def test_submitted_is_idempotent_and_exclusive(self, backend: Backend) -> None:
        async with backend.open() as journal:
            await journal.register("a", _job("a"))
            await journal.register("b", _job("b"))
            await journal.record_submitted("a", "t1", at=T0)  # adoption straight from new
            await journal.record_submitted("a", "t1", at=T0)
            with pytest.raises(JournalError, match="refusing to record task t2"):
                await journal.record_submitted("a", "t2", at=T0)
            with pytest.raises(JournalError, match="already recorded for job a"):
                await journal.record_submitted("b", "t1", at=T0)
            assert (await journal.get("b")).phase is JobPhase.NEW
            with pytest.raises(JournalError, match="no task"):
                await journal.record_status("b", "RUNNING")

    async def test_expired_needs_a_reset_and_keeps_the_billed_total(self, backend: Backend) -> None:
        async with backend.open() as journal:
            await journal.register("k", _job())
            await journal.record_intent("k", at=T0)
            await journal.record_submitted("k", "t1", at=T0)
            await journal.record_terminal(
                "k",
                JobPhase.EXPIRED,
                error=ErrorInfo("ResultExpiredError", "gone"),
                billed_seconds=4,
            )
            with pytest.raises(JournalError, match=r"expired.*reset_expired"):
                await journal.record_intent("k", at=T0)
            await journal.reset_expired("k")
            with pytest.raises(JournalError, match="not expired"):
                await journal.reset_expired("k")
            await journal.record_intent("k", at=T0 + dt.timedelta(hours=1))
            rec = await journal.get("k")
            assert (rec.phase, rec.attempts, rec.task_id, rec.error) == ("intent", 2, None, None)
            await journal.record_submitted("k", "t2", at=T0)
            assert await journal.known_task_ids() == {"t1", "t2"}
            await journal.record_finished("k", video_url="u", url_deadline=None, billed_seconds=3)
            assert (await journal.summary(now=T0)).billed_seconds == 7.0

    async def test_missing_file_goes_back_to_finished_while_the_url_works(
        self, backend: Backend
    ) -> None:
        async with backend.open() as journal:
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
            assert stale.error is not None
            assert stale.error.kind == "ResultExpiredError"
            assert stale.path is None
            with pytest.raises(JournalError, match="not done"):
                await journal.record_file_missing("stale")

    async def test_unfinished_records_and_known_tasks(self, backend: Backend) -> None:
        async with backend.open() as journal:
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
            assert [r.key for r in await journal.unfinished()] == [
                "new",
                "intent",
                "submitted",
                "finished",
            ]
            assert await journal.known_task_ids() == {"t1", "t2", "t3"}

    async def test_register_many_streams_in_order_and_adds_nothing_twice(
        self, backend: Backend
    ) -> None:
        async with backend.open() as journal:
            added = await journal.register_many((f"k{i:05d}", _job(f"c{i}")) for i in range(1200))
            assert added == 1200
            assert await journal.register_many([("k00000", _job("c0")), ("x", _job("x"))]) == 1
            seen = [rec.key async for rec in journal.records()]
        assert seen == [*(f"k{i:05d}" for i in range(1200)), "x"]

    async def test_cancelled_write_still_commits(self, backend: Backend) -> None:
        async with backend.open() as journal:
            await journal.register("k", _job())
            with anyio.CancelScope() as scope:
                scope.cancel()
                await journal.record_intent("k", at=T0)
        async with backend.open() as journal:
            assert (await journal.get("k")).phase is JobPhase.INTENT

    async def test_closed_journal_refuses_use(self, backend: Backend) -> None:
        async with backend.open() as journal:
            pass
        await journal.aclose()  # twice is fine
        with pytest.raises(JournalError, match="closed"):
            await journal.get("k")
        assert "closed" in repr(journal)

    async def test_caches_round_trip(self, backend: Backend) -> None:
        det = Detection(True, (10, 20, 30, 40), (0, 0, 100, 137), ratio="3:4", request_id="r1")
        async with backend.open() as journal:
            assert await journal.get_detection("img", "3:4") is None
            await journal.put_detection("img", "3:4", det)
            assert await journal.get_detection("img", "3:4") == det
            assert await journal.get_upload("d", "emo-v1", now=T0) is None
            await journal.put_upload(
                "d", "emo-v1", "oss://b/x.png", expires_at=T0 + dt.timedelta(hours=48)
            )
            assert await journal.get_upload("d", "emo-v1", now=T0) == "oss://b/x.png"
            assert await journal.get_upload("d", "emo-detect-v1", now=T0) is None
            later = T0 + dt.timedelta(hours=47, minutes=1)
            assert await journal.get_upload("d", "emo-v1", now=later) is None
        async with backend.open() as journal:
            assert await journal.get_detection("img", "3:4") == det
            assert await journal.get_upload("d", "emo-v1", now=T0) == "oss://b/x.png"

    async def test_summary_counts_billed_failures_and_at_risk(self, backend: Backend) -> None:
        fail = ErrorInfo("JobFailedError", "task ended FAILED", code="InternalError.Algo")
        async with backend.open() as journal:
            for key in ("d1", "f1", "r1", "soon", "gone", "later", "i1", "n1"):
                await journal.register(key, _job(key))
            await journal.record_submitted("d1", "t-d1", at=T0)
            await journal.record_done("d1", path="/o/d1.mp4", size=1, sha256="s", billed_seconds=5)
            await journal.record_terminal("f1", JobPhase.FAILED, error=fail)
            await journal.record_terminal("r1", JobPhase.REJECTED)
            for key, hours in (("soon", 1), ("gone", -1), ("later", 5)):
                await journal.record_submitted(key, f"t-{key}", at=T0)
                await journal.record_finished(
                    key,
                    video_url="u",
                    url_deadline=T0 + dt.timedelta(hours=hours),
                    billed_seconds=1,
                )
            await journal.record_intent("i1", at=T0)
            summary = await journal.summary(now=T0)
        assert summary.total == 8
        assert {k: v for k, v in summary.by_phase.items() if v} == {
            "new": 1,
            "intent": 1,
            "finished": 3,
            "done": 1,
            "failed": 1,
            "rejected": 1,
        }
        assert summary.billed_seconds == pytest.approx(8)
        assert [name for name, _ in summary.failures] == ["f1", "r1"]
        assert summary.failures[0][1].code == "InternalError.Algo"
        assert summary.failures[1][1].kind == "rejected"
        assert summary.at_risk == (
            ("gone", T0 - dt.timedelta(hours=1)),
            ("soon", T0 + dt.timedelta(hours=1)),
        )
        assert "8 jobs" in summary.render()

    async def test_is_a_journal_store(self, backend: Backend) -> None:
        async with backend.open() as journal:
            assert isinstance(journal, JournalStore)
            assert isinstance(journal, ClaimingStore) == (backend.name == "postgres")


class TestSharedUnresolved:
    async def _unresolved(self, journal: Any, key: str, *candidates: Candidate) -> None:
        await journal.register(key, _job(key))
        await journal.record_intent(key, at=T0)
        await journal.record_unresolved(key, reason="answer lost", candidates=candidates)

    async def test_unresolved_keeps_its_intent_and_is_never_sent_by_accident(
        self, backend: Backend
    ) -> None:
        async with backend.open() as journal:
            await self._unresolved(journal, "k", _cand("t-a"), _cand("t-b", 1))
        async with backend.open() as journal:
            rec = await journal.get("k")
            assert (rec.phase, rec.intent_at, rec.reason) == ("unresolved", T0, "answer lost")
            assert [r.key for r in await journal.unfinished()] == ["k"]
            assert [r.key for r in await journal.unresolved()] == ["k"]
            assert await journal.candidates("k") == [_cand("t-a"), _cand("t-b", 1)]
            with pytest.raises(JournalError, match=r"unresolved.*may have been billed"):
                await journal.record_intent("k", at=T0)
            with pytest.raises(JournalError, match="cannot be marked"):
                await journal.record_terminal("k", JobPhase.FAILED)
            with pytest.raises(JournalError, match="no task"):
                await journal.record_status("k", "RUNNING")
            assert (await journal.get("k")).attempts == 1

    async def test_only_an_intent_becomes_unresolved_and_owned_tasks_are_no_candidates(
        self, backend: Backend
    ) -> None:
        async with backend.open() as journal:
            await journal.register("new", _job("new"))
            with pytest.raises(JournalError, match="only an intent"):
                await journal.record_unresolved("new", reason="r", candidates=[_cand("t-x")])
            with pytest.raises(JournalError, match="no job with key"):
                await journal.record_unresolved("nope", reason="r", candidates=[])
            await journal.register("owner", _job("owner"))
            await journal.record_submitted("owner", "t-own", at=T0)
            await self._unresolved(journal, "k", _cand("t-a"))
            with pytest.raises(JournalError, match="t-own is job owner's task"):
                await journal.record_unresolved(
                    "k", reason="again", candidates=[_cand("t-b"), _cand("t-own")]
                )
            assert [c.task_id for c in await journal.candidates("k")] == ["t-a"]
            assert (await journal.get("k")).reason == "answer lost"
            assert await journal.known_task_ids() == {"t-own"}

    async def test_saved_files_survive_a_later_look(self, backend: Backend) -> None:
        async with backend.open() as journal:
            await self._unresolved(journal, "k", _cand("t-a"), _cand("t-b", 1))
            await journal.record_candidate_file("t-a", path="/o/t-a.mp4", size=123, sha256="ab")
            await journal.record_unresolved(
                "k", reason="still unknown", candidates=[_cand("t-a"), _cand("t-c", 2)]
            )
            got = await journal.candidates("k")
            assert [c.task_id for c in got] == ["t-a", "t-c"]
            assert (got[0].path, got[0].size, got[0].sha256) == ("/o/t-a.mp4", 123, "ab")
            with pytest.raises(JournalError, match="no unresolved job's candidate"):
                await journal.record_candidate_file("t-zz", path="x", size=1, sha256="s")

    async def test_adopting_settles_and_frees_the_task_everywhere(self, backend: Backend) -> None:
        async with backend.open() as journal:
            await self._unresolved(journal, "k1", _cand("t-a"), _cand("t-b", 1))
            await self._unresolved(journal, "k2", _cand("t-b", 1), _cand("t-c", 2))
            assert [c.task_id for c in await journal.candidates()] == ["t-a", "t-b", "t-c"]
            await journal.record_submitted("k1", "t-b", at=T0)
            rec = await journal.get("k1")
            assert (rec.phase, rec.task_id, rec.reason) == ("submitted", "t-b", None)
            assert await journal.candidates("k1") == []
            assert [c.task_id for c in await journal.candidates("k2")] == ["t-c"]
            await journal.clear_intent("k2")  # proof of absence
            assert await journal.candidates("k2") == []
            assert (await journal.get("k2")).phase is JobPhase.NEW

    async def test_assign_and_release(self, backend: Backend) -> None:
        async with backend.open() as journal:
            await self._unresolved(journal, "k1", _cand("t-a"), _cand("t-b", 1))
            await self._unresolved(journal, "k2", _cand("t-b", 1))
            await self._unresolved(journal, "k3", _cand("t-a"), _cand("t-d", 3))
            await journal.record_candidate_file("t-b", path="/o/t-b.mp4", size=5, sha256="ef")
            got = await journal.assign("t-b", "k1")
            assert (got.task_id, got.path, got.video_duration) == ("t-b", "/o/t-b.mp4", 3.9)
            rec = await journal.get("k1")
            assert (rec.phase, rec.submitted_at) == ("submitted", T0 + dt.timedelta(minutes=1))
            assert await journal.candidates("k2") == []
            assert await journal.assign("t-b", "k1") is None
            with pytest.raises(JournalError, match="already job k1's"):
                await journal.assign("t-b", "k2")
            with pytest.raises(JournalError, match="only an unresolved job or an open intent"):
                await journal.assign("t-x", "k1")
            assert await journal.release("t-d") == ["k3"]
            assert await journal.release("t-d") == []
            assert [c.task_id for c in await journal.candidates("k3")] == ["t-a"]
            assert [r.key for r in await journal.unresolved()] == ["k2", "k3"]

    async def test_summary_lists_unresolved_jobs(self, backend: Backend) -> None:
        async with backend.open() as journal:
            await self._unresolved(journal, "b", _cand("t-abc"), Candidate(task_id="t-def"))
            summary = await journal.summary(now=T0)
        assert summary.by_phase["unresolved"] == 1
        assert [(u.key, [c.task_id for c in u.candidates]) for u in summary.unresolved] == [
            ("b", ["t-abc", "t-def"])
        ]
        assert "candidates: t-abc (3.9 s, SUCCEEDED), t-def (? s, status unknown)" in (
            summary.render()
        )


# ============================================================================================
# What only the shared journal has.


class TestSharedAcrossWorkers:
    async def test_two_workers_claim_disjoint_jobs_under_concurrency(self, pg_dsn: str) -> None:
        async with await _pg(pg_dsn) as one, await _pg(pg_dsn) as two:
            assert await one.enqueue((f"k{i:03d}", _job(f"c{i}")) for i in range(300)) == 300
            # A second run of the same manifest enqueues nothing new.
            assert await two.enqueue((f"k{i:03d}", _job(f"c{i}")) for i in range(300)) == 0
            got: dict[str, list[str]] = {}

            async def worker(journal: PostgresJournal, owner: str) -> None:
                mine = got.setdefault(owner, [])
                while batch := await journal.claim(owner, 7, lease=60):
                    mine += [rec.key for rec in batch]
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                for n in range(4):
                    tg.start_soon(worker, one, f"one-{n}")
                    tg.start_soon(worker, two, f"two-{n}")
            claimed = [key for keys in got.values() for key in keys]
            assert sorted(claimed) == [f"k{i:03d}" for i in range(300)]  # each exactly once
            assert sum(1 for keys in got.values() if keys) >= 2
            # Own claims are not handed out again while their lease runs.
            assert await one.claim("one-0", 10, lease=60) == []
            assert await one.heartbeat("one-0", lease=60) == len(got["one-0"])

    async def test_an_expired_lease_returns_the_jobs(self, pg_dsn: str) -> None:
        async with await _pg(pg_dsn) as a, await _pg(pg_dsn) as b:
            await a.enqueue([("k1", _job("1")), ("k2", _job("2"))])
            with pytest.raises(ClaimLostError, match="claimed by nobody"):
                await a.reserve_submit("k1", "dead", max_tasks=10)
            held = await a.claim("dead", 10, lease=0.5)
            assert [r.key for r in held] == ["k1", "k2"]
            assert await b.claim("alive", 10, lease=60) == []
            await anyio.sleep(0.8)
            taken = await b.claim("alive", 10, lease=60)
            assert [r.key for r in taken] == ["k1", "k2"]
            # The dead worker, come back, holds nothing and may not submit.
            assert await a.heartbeat("dead", lease=60) == 0
            with pytest.raises(ClaimLostError, match="claimed by alive"):
                await a.reserve_submit("k1", "dead", max_tasks=10)
            assert (await a.get("k1")).phase is JobPhase.NEW
            assert await b.reserve_submit("k1", "alive", max_tasks=10)
            # Given back: another worker takes it at once; a finished job is never claimed.
            await b.record_submitted("k1", "t-1", at=T0)
            await b.record_done("k1", path="/o/1.mp4", size=1, sha256="s")
            assert await b.release_claims("alive") == 1
            assert [r.key for r in await a.claim("other", 10, lease=60)] == ["k2"]
            assert await a.host_of("k1") == (b.host, "/o/1.mp4")

    @pytest.mark.parametrize("across", ["batch", "account"])
    async def test_the_open_task_quota_holds_across_workers(self, pg_dsn: str, across: str) -> None:
        async with await _pg(pg_dsn) as one, await _pg(pg_dsn) as two:
            await one.enqueue((f"k{i:02d}", _job(f"c{i}")) for i in range(50))
            await one.claim("A", 25, lease=60)
            await two.claim("B", 25, lease=60)
            owners: dict[str, str] = {}
            for i in range(50):
                owners[f"k{i:02d}"] = "A" if i < 25 else "B"
            results: list[bool] = []

            async def reserve(key: str) -> None:
                journal = one if owners[key] == "A" else two
                results.append(
                    await journal.reserve_submit(key, owners[key], max_tasks=7, across=across)
                )

            async with anyio.create_task_group() as tg:
                for key in owners:
                    tg.start_soon(reserve, key)
            assert results.count(True) == 7
            assert len(results) == 50
            intents = [r for r in await one.unfinished() if r.phase is JobPhase.INTENT]
            assert len(intents) == 7
            # A task that ends frees its slot for the next reservation.
            first = intents[0]
            await one.record_submitted(first.key, "t-first", at=T0)
            waiting = next(k for k in owners if k not in {r.key for r in intents})
            journal = one if owners[waiting] == "A" else two
            assert not await journal.reserve_submit(waiting, owners[waiting], max_tasks=7)
            await one.record_finished(first.key, video_url="u", url_deadline=None, billed_seconds=1)
            assert await journal.reserve_submit(waiting, owners[waiting], max_tasks=7)

    async def test_a_task_id_cannot_be_recorded_for_two_jobs(self, pg_dsn: str) -> None:
        async with await _pg(pg_dsn, "x") as one, await _pg(pg_dsn, "y") as two:
            await one.register("a", _job("a"))
            await two.register("b", _job("b"))
            outcomes: list[str] = []

            async def record(journal: PostgresJournal, key: str) -> None:
                try:
                    await journal.record_submitted(key, "t-same", at=T0)
                    outcomes.append("ok")
                except JournalError as exc:
                    outcomes.append(str(exc))

            async with anyio.create_task_group() as tg:
                tg.start_soon(record, one, "a")
                tg.start_soon(record, two, "b")
            assert outcomes.count("ok") == 1
            [refusal] = [o for o in outcomes if o != "ok"]
            assert "t-same is already recorded for job" in refusal
            phases = {(await one.get("a")).phase, (await two.get("b")).phase}
            assert phases == {JobPhase.SUBMITTED, JobPhase.NEW}
            # Every batch of the account knows it; another account does not.
            assert await one.known_task_ids() == await two.known_task_ids() == {"t-same"}
            async with await _pg(pg_dsn, "x", account="other") as stranger:
                assert await stranger.known_task_ids() == set()
            # Owned anywhere in the account: nobody's candidate.
            await two.register("c", _job("c"))
            await two.record_intent("c", at=T0)
            with pytest.raises(JournalError, match=r"is job [ab]'s task"):
                await two.record_unresolved("c", reason="lost", candidates=[_cand("t-same")])

    async def test_open_intents_span_workers_and_batches(self, pg_dsn: str) -> None:
        async with await _pg(pg_dsn, "x") as one, await _pg(pg_dsn, "y") as two:
            await one.enqueue([("a", _job("a")), ("b", _job("b"))])
            await two.enqueue([("c", _job("c"))])
            await one.claim("w1", 10, lease=60)
            await two.claim("w2", 10, lease=60)
            before = await one.server_now()
            assert await one.reserve_submit("a", "w1", max_tasks=5, at=T0)
            assert await two.reserve_submit("c", "w2", max_tasks=5)
            await one.record_intent("b", at=T0)
            await one.record_submitted("b", "t-b", at=T0)
            seen = await two.open_intents()
            assert [(i.batch, i.key, i.owner, i.phase) for i in seen] == [
                ("x", "a", "w1", "intent"),
                ("y", "c", "w2", "intent"),
            ]
            after = await two.server_now()
            assert all(before <= i.server_at <= after for i in seen)
            assert seen[0].intent_at == T0
            assert seen[0].lease_until is not None
            assert seen[0].lease_until > after
            await one.record_submitted("a", "t-a", at=T0)
            assert [i.key for i in await one.open_intents()] == ["c"]

    async def test_two_workers_opening_a_fresh_database_together(self, pg_dsn: str) -> None:
        journals: list[PostgresJournal] = []

        async def opener(batch: str) -> None:
            journals.append(await _pg(pg_dsn, batch))

        async with anyio.create_task_group() as tg:
            for batch in ("x", "x", "y"):
                tg.start_soon(opener, batch)
        try:
            await journals[0].register("k", _job())
            assert all([await j.known_task_ids() == set() for j in journals])
        finally:
            for journal in journals:
                await journal.aclose()

    async def test_intent_survives_an_immediate_exit(self, pg_dsn: str) -> None:
        code, _, err = await _python(
            """
            import datetime as dt, os, sys, anyio
            from emo_async._journal.postgres import PostgresJournal
            from emo_async._models import Job
            async def main():
                j = await PostgresJournal.open(sys.argv[1], batch="lessons", account=sys.argv[2])
                await j.register("k", Job("p.png", "v.wav", name="clip"))
                await j.record_intent("k", at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
                os._exit(0)
            anyio.run(main)
            """,
            pg_dsn,
            ACCOUNT,
        )
        assert code == 0, err
        async with await _pg(pg_dsn) as journal:
            rec = await journal.get("k")
        assert (rec.phase, rec.attempts) == ("intent", 1)

    async def test_import_emo_async_does_not_import_psycopg(self) -> None:
        code, out, err = await _python(
            """
            import sys, emo_async, emo_async._journal, emo_async._pg
            print(sorted(m for m in sys.modules if "psycopg" in m))
            """
        )
        assert (code, out.strip()) == (0, "[]"), err


class TestServerRestart:
    async def test_a_restart_mid_use_loses_no_acknowledged_write(
        self, pg_server: TempPostgres, pg_dsn: str
    ) -> None:
        pool = await open_pool(pg_dsn, max_size=4, connect_timeout=2)
        journal = await PostgresJournal.open(pg_dsn, batch="lessons", account=ACCOUNT, pool=pool)
        keys = [f"k{i}" for i in range(6)]
        acked: dict[str, int] = dict.fromkeys(keys, -1)
        tried: dict[str, int] = dict.fromkeys(keys, -1)
        unavailable = 0
        other: list[BaseException] = []
        restarted = anyio.Event()
        after = dict.fromkeys(keys, 0)
        try:
            for key in keys:
                await journal.register(key, _job(key))
                await journal.record_submitted(key, f"t-{key}", at=T0)

            async def writer(key: str) -> None:
                nonlocal unavailable
                i = 0
                while after[key] < 5:
                    tried[key] = i
                    try:
                        await journal.record_status(key, f"S{i:05d}")
                        acked[key] = i
                        if restarted.is_set():
                            after[key] += 1
                    except PostgresUnavailable:
                        unavailable += 1
                        await anyio.sleep(0.1)
                    except BaseException as exc:
                        other.append(exc)
                        raise
                    i += 1
                    await anyio.sleep(0.01)

            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    for key in keys:
                        tg.start_soon(writer, key)
                    await anyio.sleep(0.3)
                    await anyio.to_thread.run_sync(lambda: pg_server.restart(down_for=1.0))
                    restarted.set()
        finally:
            await journal.aclose()
            await pool.close()
        assert other == []
        assert unavailable > 0  # the second the server was down was seen, not hidden
        async with await _pg(pg_dsn) as fresh:
            for key in keys:
                rec = await fresh.get(key)
                seen = int(rec.task_status[1:])
                # Every acknowledged write is there; an unacknowledged one may or may not be.
                assert acked[key] <= seen <= tried[key], (key, acked[key], seen, tried[key])
