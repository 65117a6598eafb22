"""The journal's SQLite connection, owned by one thread of its own, with group commit.

Writes queued at the same moment (many jobs of a batch at once) share one transaction and one
fsync, and the event loop hears back once for all of them; each caller still resumes only after
its own write is committed. Nothing here knows what the journal stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio

from .._exceptions import JournalCorruptError, JournalError

__all__ = ["Connection", "atomic", "connect", "sqlite_errors"]

logger = logging.getLogger("emo_async.journal")

_BUSY_TIMEOUT_MS: Final = 10_000


@contextlib.contextmanager
def sqlite_errors(path: Path, doing: str) -> Iterator[None]:
    """Turn an sqlite3 error into a JournalCorruptError (damage) or a JournalError."""
    try:
        yield
    except sqlite3.Error as exc:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            raise JournalCorruptError(f"journal {path} is damaged ({doing}: {exc})") from exc
        raise JournalError(f"journal {path}: {doing} failed: {exc}") from exc


@contextlib.contextmanager
def atomic(db: sqlite3.Connection) -> Iterator[None]:
    """Make several statements of one write call land whole or not at all.

    A write alone in its group runs in autocommit mode, where each statement would commit on
    its own; a savepoint opens a transaction there (committed on release) and nests inside the
    group's transaction otherwise.
    """
    db.execute("SAVEPOINT journal_atomic")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK TO journal_atomic")
            db.execute("RELEASE journal_atomic")
        raise
    db.execute("RELEASE journal_atomic")


def connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; the journal's thread opens its own.
    if read_only:
        conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    except BaseException:
        conn.close()
        raise
    return conn


_T = TypeVar("_T")

_READ: Final = 0
_WRITE: Final = 1
#: Run alone, outside any transaction: opening, pragmas, the schema script, closing.
_ALONE: Final = 2
#: The most calls one transaction takes in.
_GROUP_MAX: Final = 256


class _Call:
    __slots__ = ("deferred", "fn", "future", "kind", "loop", "ok", "owner", "patience", "value")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        kind: int,
        loop: asyncio.AbstractEventLoop,
        deferred: list[Callable[[sqlite3.Connection], object]] | None = None,
    ) -> None:
        self.fn = fn
        self.kind = kind
        self.loop = loop
        #: Writes nobody waits for, run just before ``fn`` in the same transaction.
        self.deferred = deferred
        #: Seconds this write's commit may wait for other writes to share it.
        self.patience = 0.0
        self.future: asyncio.Future[Any] = loop.create_future()
        self.ok = False
        self.value: Any = None
        #: The connection whose deferred writes this call carries (set when it carries some).
        self.owner: Connection | None = None


def _deliver(calls: list[_Call]) -> None:
    for call in calls:
        owner = call.owner
        if call.deferred and not call.ok and owner is not None and not owner.closed:
            # Not committed (the call failed, or its transaction did): the deferred writes go
            # back in front of the queue for the next call. Each is idempotent (INSERT OR
            # IGNORE / OR REPLACE), so the ones that ran before the failure may run again; a
            # job registered in memory must not lose its row while its key stays known.
            owner._deferred[:0] = call.deferred
            logger.warning(
                "journal: %d deferred writes not committed (%s); kept for the next write",
                len(call.deferred),
                call.value,
            )
        if not call.future.done():  # a cancelled reader no longer waits
            if call.ok:
                call.future.set_result(call.value)
            else:
                call.future.set_exception(call.value)


class Connection:
    """An SQLite connection owned by one thread, called from the event loop.

    Calls run in the order they were made. The thread takes every call already queued when it
    gets to work (up to ``_GROUP_MAX``) and runs the writes among them in one transaction: one
    ``BEGIN IMMEDIATE`` ... ``COMMIT``, so one fsync, and one wake-up of the event loop for
    the whole group. A write's caller resumes only once that transaction is committed. Each
    write runs in a savepoint, so a write that raises (an unknown key, a constraint) leaves
    no trace and does not undo its neighbours. An error that ends the whole transaction (a
    full disk, an I/O error) or a failed ``COMMIT`` fails every write of the group: none of
    them is reported committed unless it is. A write alone in its group runs in autocommit
    mode, so a write call must make at most one modifying statement (each of the journal's
    does; reads around it are fine).

    A patient write (``patience`` > 0) waits up to that long for others to join its group,
    and goes at once when a call comes that may not wait. :meth:`defer` queues a write nobody
    waits for (a cache entry, a job that has cost nothing yet): it costs no commit and no thread
    hop of its own, and runs at the start of the next call, in its transaction, or when the
    connection closes.
    """

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self._path = path
        self._read_only = read_only
        self._db: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._deferred: list[Callable[[sqlite3.Connection], object]] = []
        self.closed = False

    @classmethod
    async def open(cls, path: Path, *, read_only: bool = False) -> Connection:
        conn = cls(path, read_only=read_only)
        # A daemon thread: a journal nobody closed must not keep the interpreter alive.
        conn._thread = threading.Thread(target=conn._serve, name="emo-journal", daemon=True)
        conn._thread.start()
        try:
            await conn._call(conn._connect, _ALONE)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    def _connect(self, _: Any) -> None:
        self._db = connect(self._path, read_only=self._read_only)

    async def read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` on the connection (not cancel-shielded: a cancelled read is dropped)."""
        return await self._call(fn, _READ)

    async def write(self, fn: Callable[[sqlite3.Connection], _T], *, patience: float = 0.0) -> _T:
        """Run ``fn`` in a transaction; return once it is committed (even when cancelled).

        ``patience``: seconds the commit may wait for other writes to share it (it goes as soon
        as a write comes that may not wait).
        """
        with anyio.CancelScope(shield=True):
            result = await self._call(fn, _WRITE, patience=patience)
        return result

    async def alone(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` outside any transaction (pragmas, scripts), shielded."""
        with anyio.CancelScope(shield=True):
            result = await self._call(fn, _ALONE)
        return result

    def defer(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        """Have ``fn`` (one modifying statement) run first in the next call's transaction."""
        self._deferred.append(fn)

    async def close(self) -> None:
        """Run what is queued, close the connection and end the thread. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        with anyio.CancelScope(shield=True):
            if self._deferred:
                try:
                    await self._call(_nothing, _WRITE)
                except Exception as exc:
                    # Deferred writes are caches and jobs nothing was spent on: losing them
                    # costs a repeated upload or detection, never money.
                    logger.warning("journal %s: deferred writes were lost: %s", self._path, exc)
            # Answered after the connection is closed; the thread ends right after.
            await self._call(self._close, _ALONE)

    def _close(self, _: Any) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
        raise _Stop

    def _call(
        self, fn: Callable[[sqlite3.Connection], _T], kind: int, *, patience: float = 0.0
    ) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        if self._deferred and kind != _ALONE:
            deferred, self._deferred = self._deferred, []
            call = _Call(fn, _WRITE, loop, deferred)
            call.owner = self
        else:
            call = _Call(fn, kind, loop)
        call.patience = patience
        self._queue.put(call)
        return call.future

    # -- the thread

    def _serve(self) -> None:
        carry: _Call | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first.kind == _ALONE:
                if self._run_alone(first):
                    return
                continue
            group = [first]
            # A patient write waits for company until this moment (or an impatient call).
            until = time.monotonic() + first.patience if first.patience > 0 else None
            while len(group) < _GROUP_MAX:
                try:
                    if until is None:
                        nxt = self._queue.get_nowait()
                    else:
                        nxt = self._queue.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if nxt.kind == _ALONE:
                    carry = nxt
                    break
                group.append(nxt)
                if nxt.patience <= 0:
                    until = None  # someone may not wait: take what is queued and go
            self._run_group(group)

    def _post(self, calls: list[_Call]) -> None:
        loop = calls[0].loop
        if all(call.loop is loop for call in calls):
            batches = [(loop, calls)]
        else:  # pragma: no cover - one journal used from two event loops
            batches = [(call.loop, [call]) for call in calls]
        for target, some in batches:
            with contextlib.suppress(RuntimeError):  # that event loop is closed
                target.call_soon_threadsafe(_deliver, some)

    def _run_alone(self, call: _Call) -> bool:
        stop = False
        try:
            call.value = call.fn(self._db)  # type: ignore[arg-type]
            call.ok = True
        except _Stop:
            call.ok, stop = True, True
        except Exception as exc:
            call.value = exc
        self._post([call])
        return stop

    def _run_group(self, group: list[_Call]) -> None:
        db = self._db
        if db is None:
            for call in group:
                call.value = sqlite3.ProgrammingError("the journal's connection is closed")
            self._post(group)
            return
        if sum(call.kind == _WRITE for call in group) < 2 and not any(c.deferred for c in group):
            # Nothing to share: each statement commits on its own (the common case when jobs
            # trickle in), without the cost of a transaction and savepoint around it.
            for call in group:
                if db.in_transaction:
                    # Left open by a COMMIT and a ROLLBACK that both failed: a statement here
                    # would join it instead of committing, so it must not be reported done.
                    with contextlib.suppress(Exception):
                        db.execute("ROLLBACK")
                if db.in_transaction:
                    call.value = sqlite3.OperationalError(
                        "the journal's connection is stuck in a failed transaction"
                    )
                    continue
                try:
                    call.value, call.ok = call.fn(db), True
                except Exception as exc:
                    call.value = exc
            self._post(group)
            return
        in_txn: list[_Call] = []  # the calls whose fate depends on the open transaction
        for call in group:
            if call.kind == _WRITE and not in_txn:
                try:
                    db.execute("BEGIN IMMEDIATE")
                except Exception as exc:
                    call.value = exc
                    continue
            if call.kind == _READ:
                if in_txn:
                    in_txn.append(call)
                try:
                    call.value, call.ok = call.fn(db), True
                except Exception as exc:
                    call.value = exc
            else:
                in_txn.append(call)
                for write in call.deferred or ():
                    ok, value = _step(db, write)
                    if not ok:
                        # The call may depend on it (an intent on a job registered just
                        # before): it fails with it, the other deferred writes stay.
                        call.value = value
                        break
                else:
                    call.ok, call.value = _step(db, call.fn)
            if in_txn and not db.in_transaction:
                # SQLite gave up the whole transaction (a full disk, an I/O error): every write
                # made in it is lost, none may be reported committed.
                lost = call.value if not call.ok else sqlite3.OperationalError("rolled back")
                _fail(in_txn, lost)
                in_txn = []
        if in_txn:
            try:
                db.execute("COMMIT")
            except Exception as exc:
                with contextlib.suppress(Exception):
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                _fail(in_txn, exc)
        self._post(group)


def _step(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> tuple[bool, Any]:
    """Run ``fn`` in a savepoint of the open transaction: all of it, or none of it."""
    try:
        db.execute("SAVEPOINT journal_call")
        try:
            return True, fn(db)
        except Exception as exc:
            if db.in_transaction:
                db.execute("ROLLBACK TO journal_call")
            return False, exc
        finally:
            if db.in_transaction:
                db.execute("RELEASE journal_call")
    except Exception as exc:
        return False, exc


class _Stop(Exception):
    """Ends the journal's thread (raised by the closing call)."""


def _nothing(db: sqlite3.Connection) -> None:
    return None


def _fail(calls: list[_Call], exc: BaseException) -> None:
    for call in calls:
        if call.ok:
            call.ok, call.value = False, exc
