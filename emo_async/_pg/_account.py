"""One DashScope account shared by several processes: its limits and its one poller.

A :class:`Client` given ``shared_account="postgresql://…"`` opens a :class:`AccountLink`:

* its rate limiters become :class:`SharedRateLimiter` rows of the account (one budget for all
  processes, one adaptive state: a 429 anywhere slows everyone);
* its :meth:`Client.wait` goes through ``emo_account_tasks``: the task is registered there, one
  process of the account (the holder of the :class:`Lease`) runs the client's own
  :class:`StatusPoller` over every open task of the account, writes each final snapshot to the
  table and ``NOTIFY``\\ s; the others wake on ``LISTEN`` and read the table, and also read it
  every ``fallback_interval`` seconds, which alone is enough (``LISTEN`` does not pass
  PgBouncer in transaction mode);
* every process campaigns for the lease; when the holder closes it hands the lease over at
  once, when it dies the lease runs out and another process takes the account's tasks over.

Everything runs in the client's task group; closing the client releases the lease.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from anyio.abc import TaskStatus as AnyioTaskStatus

from .._exceptions import ClientClosedError, EmoError
from .._models import Task
from ._connect import PostgresUnavailable, is_dsn, open_pool, redact_dsn
from ._leader import Lease
from ._limits import SharedRateLimiter
from ._migrate import migrate

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from .._config import Limits
    from .._poller import StatusPoller

__all__ = ["AccountLink", "SharedAccount", "account_id"]

logger = logging.getLogger("emo_async.pg")


@attrs.frozen
class SharedAccount:
    """Where and how processes share one account (``Client(shared_account=…)``).

    Attributes:
        dsn: The PostgreSQL database (``postgresql://…``); never shown with its password.
        account: The name the processes share the account under; by default derived from the
            base URL, workspace and key (processes with the same key share). Give the same
            name to processes using different keys of one account.
        lease_seconds: How long the poller's lease lasts without renewal: how soon another
            process takes over when the poller dies.
        fallback_interval: How often a waiting process reads the table without a
            notification (the only way behind PgBouncer in transaction mode).
        listen: Wake on ``NOTIFY`` over one dedicated connection (off behind PgBouncer in
            transaction mode, where it cannot work).
        keep_finished: Seconds a finished task's row is kept for late waiters.
    """

    dsn: str = attrs.field(repr=redact_dsn)
    account: str | None = None
    lease_seconds: float = attrs.field(default=10.0, validator=attrs.validators.gt(0.0))
    fallback_interval: float = attrs.field(default=0.5, validator=attrs.validators.gt(0.0))
    listen: bool = True
    keep_finished: float = attrs.field(default=3600.0, validator=attrs.validators.gt(0.0))

    def __attrs_post_init__(self) -> None:
        if not is_dsn(self.dsn):
            raise ValueError("shared_account must be a postgresql:// DSN")


def account_id(base_url: str, workspace: str | None, api_key: str) -> str:
    """The default account name: the one-way digest the shared journal records too."""
    from .._batch._shared import account_fingerprint

    return "key-" + account_fingerprint(base_url, workspace, api_key)[:24]


def _channel(account: str) -> str:
    return "emo_acct_" + hashlib.sha256(account.encode()).hexdigest()[:24]


def _plain(value: Any) -> Any:
    """A task's read-only JSON body as plain dicts and lists, for ``jsonb``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_FAMILIES = ("task", "detect", "submit", "policy", "cancel", "list")

_REGISTER = """
WITH ins AS (
    INSERT INTO emo_account_tasks (account, task_id, owner, audio_seconds)
    VALUES (%(account)s, %(task_id)s, %(owner)s, %(audio)s)
    ON CONFLICT (account, task_id) DO NOTHING
    RETURNING task_id
)
SELECT pg_notify(%(channel)s, 'new') FROM ins
"""

_FINISHED = """
SELECT task_id, status, result, error FROM emo_account_tasks
WHERE account = %(account)s AND task_id = ANY(%(ids)s) AND status <> 'open'
"""

_OPEN = """
SELECT task_id, audio_seconds, extract(epoch FROM clock_timestamp() - submitted_at)::float8
FROM emo_account_tasks WHERE account = %(account)s AND status = 'open'
"""

_WRITE = """
WITH done AS (
    UPDATE emo_account_tasks SET status = %(status)s, result = %(result)s, error = %(error)s,
        finished_at = clock_timestamp()
    WHERE account = %(account)s AND task_id = %(task_id)s AND status = 'open'
    RETURNING task_id
)
SELECT pg_notify(%(channel)s, 'done') FROM done
"""

_PRUNE = """
DELETE FROM emo_account_tasks WHERE account = %(account)s AND status <> 'open'
    AND finished_at < clock_timestamp() - make_interval(secs => %(keep)s)
"""


@attrs.define(eq=False)
class _Waiter:
    done: anyio.Event = attrs.field(factory=anyio.Event)
    result: Task | None = None
    error: BaseException | None = None
    waiters: int = 0


async def _migrate(pool: AsyncConnectionPool[Any]) -> None:
    import psycopg.errors

    for attempt in range(3):
        try:
            await migrate(pool)
            return
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            # Processes starting together race on ``CREATE TABLE IF NOT EXISTS`` of the
            # migrations table (it is created outside the migration lock): the loser retries.
            if attempt == 2:
                raise
            await anyio.sleep(0.05)


class AccountLink:
    """One process's link to a shared account (see the module's docstring)."""

    def __init__(
        self,
        config: SharedAccount,
        pool: AsyncConnectionPool[Any],
        account: str,
        limiters: dict[str, SharedRateLimiter],
    ) -> None:
        self.config = config
        self.account = account
        self.limiters = limiters
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = pool
        self._channel = _channel(account)
        self.lease = Lease(
            pool, account, self.owner, seconds=config.lease_seconds, channel=self._channel
        )
        self._waiters: dict[str, _Waiter] = {}
        self._read_now = anyio.Event()
        self._new_tasks = anyio.Event()
        self._leader_free = anyio.Event()
        self._closed: BaseException | None = None
        #: Terms this process held the lease (statistics, tests).
        self.terms = 0

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, config: SharedAccount, account: str, limits: Limits, limiter_kwargs: dict[str, Any]
    ) -> AccountLink:
        """Open the pool, migrate, and set up the account's limiter rows."""
        pool = await open_pool(config.dsn, min_size=1, max_size=8, name="emo_async_account")
        try:
            await _migrate(pool)
            rates = {
                "task": limits.task_qps,
                "detect": limits.detect_qps,
                "submit": limits.submit_qps,
                "policy": limits.policy_qps,
                "cancel": limits.cancel_qps,
                "list": limits.list_qps,
            }
            limiters = {
                name: SharedRateLimiter(pool, account, name, rates[name], **limiter_kwargs)
                for name in _FAMILIES
            }
            for lim in limiters.values():
                await lim.setup()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await pool.close()
            raise
        return cls(config, pool, account, limiters)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._pool.close()

    # -- waiting -----------------------------------------------------------------------------

    async def wait(self, task_id: str, *, audio_seconds: float | None = None) -> Task:
        """Wait until the account's poller saw the task finished; its final snapshot."""
        if self._closed is not None:
            raise self._closed
        waiter = self._waiters.get(task_id)
        if waiter is None:
            waiter = self._waiters[task_id] = _Waiter()
        waiter.waiters += 1
        try:
            async with self._pool.connection() as conn:
                await conn.execute(
                    _REGISTER,
                    {
                        "account": self.account,
                        "task_id": task_id,
                        "owner": self.owner,
                        "audio": audio_seconds,
                        "channel": self._channel,
                    },
                )
            self._new_tasks.set()
            self._read_now.set()
            await waiter.done.wait()
        finally:
            waiter.waiters -= 1
            if waiter.waiters == 0 and self._waiters.get(task_id) is waiter:
                del self._waiters[task_id]
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None
        return waiter.result

    def _deliver(self, task_id: str, result: Task | None, error: BaseException | None) -> None:
        waiter = self._waiters.get(task_id)
        if waiter is not None and not waiter.done.is_set():
            waiter.result, waiter.error = result, error
            waiter.done.set()

    def fail_all(self, exc: BaseException) -> None:
        """Wake every waiter with an error (the client is closing)."""
        self._closed = exc
        for task_id in list(self._waiters):
            self._deliver(task_id, None, exc)

    # -- the background ----------------------------------------------------------------------

    async def run(
        self,
        poller: StatusPoller,
        *,
        task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Everything this process does for the account, until cancelled (the client closes):
        sending limiter reports, reading finished tasks, listening, and campaigning for the
        lease (polling for the account while it holds it)."""
        try:
            async with anyio.create_task_group() as tg:
                for lim in self.limiters.values():
                    await tg.start(lim.run)
                tg.start_soon(self._read_loop)
                if self.config.listen:
                    tg.start_soon(self._listen_loop)
                tg.start_soon(self._campaign, poller)
                task_status.started()
        finally:
            if self.lease.term is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    try:
                        await self.lease.release()
                    except Exception as exc:
                        logger.info("could not release the account's lease: %s", exc)

    async def _read_loop(self) -> None:
        while True:
            with anyio.move_on_after(self.config.fallback_interval):
                await self._read_now.wait()
            self._read_now = anyio.Event()
            ids = [t for t, w in self._waiters.items() if not w.done.is_set()]
            if not ids:
                continue
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(_FINISHED, {"account": self.account, "ids": ids})
                    rows = await cur.fetchall()
            except Exception as exc:
                logger.info("could not read the account's finished tasks: %s", exc)
                continue
            for task_id, status, result, error in rows:
                if status == "finished":
                    task = Task.from_json(result)
                    if not task.task_id:
                        task = attrs.evolve(task, task_id=task_id)
                    self._deliver(task_id, task, None)
                else:
                    failure = EmoError(f"the account's poller gave up on task {task_id}: {error}")
                    self._deliver(task_id, None, failure)

    async def _listen_loop(self) -> None:
        """Wake the readers on ``NOTIFY`` (best effort: the readers poll anyway)."""
        import psycopg

        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.config.dsn, autocommit=True, application_name="emo_async_listen"
                )
                async with conn:
                    await conn.execute(f'LISTEN "{self._channel}"'.encode())
                    # Anything may have happened while we were not listening.
                    self._read_now.set()
                    self._new_tasks.set()
                    self._leader_free.set()
                    async for note in conn.notifies():
                        if note.payload == "done":
                            self._read_now.set()
                        elif note.payload == "new":
                            self._new_tasks.set()
                        elif note.payload == "leader":
                            self._leader_free.set()
            except psycopg.Error as exc:
                logger.debug("LISTEN connection lost (%s); reading the table meanwhile", exc)
            await anyio.sleep(min(5.0, self.config.lease_seconds / 2))

    async def _campaign(self, poller: StatusPoller) -> None:
        interval = self.config.lease_seconds / 3
        while True:
            try:
                held = await self.lease.take()
            except Exception as exc:
                logger.info("could not bid for the account's lease: %s", exc)
                held = False
            if held:
                self.terms += 1
                logger.info("this process now polls for the account (term %s)", self.lease.term)
                await self._term(poller)
                continue
            with anyio.move_on_after(interval):
                await self._leader_free.wait()
            self._leader_free = anyio.Event()

    async def _term(self, poller: StatusPoller) -> None:
        """Poll for the account while the lease holds."""
        async with anyio.create_task_group() as tg:
            await tg.start(poller.run)
            tg.start_soon(self._lead, tg, poller)
            await self._heartbeat()
            tg.cancel_scope.cancel()
        logger.info("this process no longer polls for the account")

    async def _heartbeat(self) -> None:
        """Renew the lease until it is lost (returns then)."""
        every = self.lease.seconds / 3
        renewed = time.monotonic()
        while True:
            await anyio.sleep(every)
            try:
                if not await self.lease.renew():
                    return
                renewed = time.monotonic()
            except Exception as exc:
                # Our clock measures only how long we went without renewal; once most of
                # the lease may be gone, another process may have taken over.
                if time.monotonic() - renewed > 0.75 * self.lease.seconds:
                    logger.warning("lease not renewed (%s): stepping down", exc)
                    return

    async def _lead(self, tg: anyio.abc.TaskGroup, poller: StatusPoller) -> None:
        watching: set[str] = set()
        pruned = 0.0
        while True:
            self._new_tasks = anyio.Event()
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(_OPEN, {"account": self.account})
                    rows = await cur.fetchall()
                    if time.monotonic() - pruned > 60:
                        pruned = time.monotonic()
                        await conn.execute(
                            _PRUNE, {"account": self.account, "keep": self.config.keep_finished}
                        )
            except Exception as exc:
                logger.info("could not read the account's open tasks: %s", exc)
                rows = []
            now = time.monotonic()
            for task_id, audio, age in rows:
                if task_id in watching:
                    continue
                watching.add(task_id)
                poller.watch(task_id, audio_seconds=audio, submitted_at=now - max(0.0, age))
                tg.start_soon(self._see_through, poller, task_id, audio, watching)
            with anyio.move_on_after(self.config.fallback_interval):
                await self._new_tasks.wait()

    async def _see_through(
        self, poller: StatusPoller, task_id: str, audio: float | None, watching: set[str]
    ) -> None:
        try:
            try:
                task = await poller.wait(task_id, audio_seconds=audio)
            except ClientClosedError:
                # This client is closing: the task stays open for the next poller.
                return
            except Exception as exc:
                await self._write(task_id, None, exc)
                return
            await self._write(task_id, task, None)
        finally:
            watching.discard(task_id)

    async def _write(self, task_id: str, task: Task | None, exc: BaseException | None) -> None:
        # Ours first: a waiter of the leading process need not wait for the table.
        self._deliver(task_id, task, exc)
        params = {
            "account": self.account,
            "task_id": task_id,
            "status": "finished" if task is not None else "error",
            "result": json.dumps(_plain(task.raw)) if task is not None else None,
            "error": None if exc is None else f"{type(exc).__name__}: {exc}",
            "channel": self._channel,
        }
        for attempt in range(5):
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(_WRITE, params)
                return
            except Exception as exc2:
                logger.info("could not record task %s as finished: %s", task_id, exc2)
                await anyio.sleep(0.5 * (attempt + 1))


async def open_link(
    config: SharedAccount | str,
    *,
    base_url: str,
    workspace: str | None,
    api_key: str,
    limits: Limits,
) -> AccountLink:
    """Open a client's link to its shared account (raises :class:`PostgresUnavailable`)."""
    if isinstance(config, str):
        config = SharedAccount(config)
    account = config.account or account_id(base_url, workspace, api_key)
    try:
        return await AccountLink.open(config, account, limits, {})
    except PostgresUnavailable:
        raise
    except Exception as exc:
        msg = str(exc).replace(config.dsn, redact_dsn(config.dsn))
        raise PostgresUnavailable(f"cannot use the shared account's database: {msg}") from None
