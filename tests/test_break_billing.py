"""Attacks on the billing rule (resend only on proof that no task exists, adopt only on proof
that the task is ours, otherwise ``unresolved`` with every paid video kept), through real
sockets: the simulator on loopback and a real PostgreSQL, reached through a TCP gate a test
can cut to partition one worker from the database while it stays alive.

Each test is an attack that once broke the rule, or a guard that fails if it breaks again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import psycopg
import pytest
from test_batch import client_for, sha, sim_config

import emo_async
from emo_async import Limits, OutcomeState
from emo_async._owned import account_registry
from emo_async._samples import make_sample_set
from emo_async.simulator import Simulator

pytestmark = pytest.mark.anyio

BATCH = "attack"


@pytest.fixture(autouse=True)
def separate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker stands for a process of its own: no registry of created tasks shared."""
    monkeypatch.setattr(account_registry, "acquire", lambda base, key, mine: mine)
    monkeypatch.setattr(account_registry, "release", lambda base, key: None)


class Gate:
    """A TCP relay in front of PostgreSQL: ``cut()`` drops every connection through it and
    refuses new ones (a network partition of whoever uses :attr:`dsn`); ``heal()`` lets them
    through again."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._parts = parts
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def dsn(self) -> str:
        netloc = self._parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        loc = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        return urlunsplit(self._parts._replace(netloc=loc))

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self._upstream)
        except OSError:
            w.close()
            return
        self._writers |= {w, uw}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(r, uw), pump(ur, w))
        self._writers -= {w, uw}

    def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def heal(self) -> None:
        await self.open()

    async def aclose(self) -> None:
        if self._server is not None:
            self.cut()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


@contextlib.asynccontextmanager
async def gate_for(dsn: str) -> AsyncIterator[Gate]:
    gate = Gate(dsn)
    await gate.open()
    try:
        yield gate
    finally:
        await gate.aclose()


async def rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        try:
            cur = await conn.execute(sql.encode())
        except psycopg.errors.UndefinedTable:
            return []  # not migrated yet
        return list(await cur.fetchall())


async def wait_for(dsn: str, sql: str, timeout: float = 20.0) -> list[tuple[Any, ...]]:
    with anyio.fail_after(timeout):
        while True:
            found = await rows(dsn, sql)
            if found:
                return found
            await anyio.sleep(0.05)


def audio_sha(job: emo_async.Job) -> str:
    return sha(Path(job.audio).read_bytes())


def tasks_by_audio(sim: Simulator) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for t in sim.ledger.tasks_created:
        if t.task_id in sim.ledger.foreign_tasks:
            continue
        seen.setdefault(sim.ledger.task_inputs(t.task_id).audio_sha256, []).append(t.task_id)
    return seen


@pytest.mark.slow
async def test_partitioned_worker_whose_post_waits_past_its_lease_does_not_bill_twice(
    tmp_path: Path, pg_dsn: str
) -> None:
    """(d) A worker records its intent, then its POST waits at the client's submit limiter;
    meanwhile it is cut off from PostgreSQL, so its lease runs out and another worker takes
    the job over, finds no task in the list and (rightly, on that evidence) sends it again.
    The first worker, alive, must not send its POST once its lease may have run out."""
    jobs = make_sample_set(tmp_path / "in", 6, portraits=2, seconds=(0.5, 1.5))
    async with Simulator(sim_config()) as sim, gate_for(pg_dsn) as gate:
        a_out: list[emo_async.Outcome] = []
        a_error: list[BaseException] = []
        a_ended = anyio.Event()

        async def worker_a() -> None:
            # One POST every ~7 s: the second waits at the limiter after its intent.
            limits = Limits(task_qps=40, submit_qps=0.15, detect_qps=40, policy_qps=100)
            try:
                async with client_for(sim, limits=limits) as client:
                    run = client.run_batch(
                        jobs, tmp_path / "a", journal=gate.dsn, batch=BATCH, lease=1.0
                    )
                    async with run as outcomes:
                        async for o in outcomes:
                            a_out.append(o)
            except Exception as exc:  # its database went away: the run may end
                a_error.append(exc)
            finally:
                a_ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker_a)
            # A's first task is out and its second intent recorded: the POST now waits.
            await wait_for(
                pg_dsn,
                "SELECT key FROM emo_jobs WHERE phase = 'intent' AND EXISTS"
                " (SELECT 1 FROM emo_jobs WHERE phase = 'done')",
            )
            assert len(sim.ledger.tasks_created) == 1
            gate.cut()
            async with client_for(sim) as client:
                b_out = await client.run_batch_all(
                    [], tmp_path / "b", journal=pg_dsn, batch=BATCH, lease=1.0, max_tasks=8
                )
            # A's limiter lets its POST go about now, if nothing stops it.
            await anyio.sleep(6.0)
            await gate.heal()
            # A finds the batch done (or its job another's) and ends by itself.
            with anyio.fail_after(30):
                await a_ended.wait()
        assert sim.ledger.duplicate_tasks() == {}
        assert max(len(v) for v in tasks_by_audio(sim).values()) == 1
        done = [o for o in [*a_out, *b_out] if o.state == OutcomeState.DONE]
        # Nothing lost either: every job done once, by one worker or the other.
        assert sorted(o.job.display_name for o in done) == sorted(j.display_name for j in jobs)
        assert not a_error
        for o in done:
            assert o.task_id is not None
            assert sim.ledger.task_inputs(o.task_id).audio_sha256 == audio_sha(o.job)
