"""Opening a psycopg 3 async pool that is safe behind PgBouncer in transaction mode."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .._exceptions import EmoError

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

__all__ = ["PostgresUnavailable", "is_dsn", "open_pool", "redact_dsn"]

_SCHEMES = ("postgresql://", "postgres://")


class PostgresUnavailable(EmoError):
    """PostgreSQL could not be reached (or the extra is not installed).

    Nothing billed is sent while the shared journal is unreachable: the caller stops, and the
    batch resumes from the journal once the server is back.
    """


def is_dsn(value: object) -> bool:
    """Whether ``value`` names a PostgreSQL database (a ``postgresql://`` URL)."""
    return isinstance(value, str) and value.startswith(_SCHEMES)


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, fit for logs and messages."""
    dsn = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password=)[^&\s]*", r"\1***", dsn)


async def _configure(conn: AsyncConnection[Any]) -> None:
    # Autocommit: every statement or explicit transaction stands alone (PgBouncer transaction
    # mode hands each transaction to any server connection).
    await conn.set_autocommit(True)


async def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    name: str = "emo_async",
    connect_timeout: float = 10.0,
) -> AsyncConnectionPool[Any]:
    """Open (and wait for) a pool of autocommit connections with prepared statements off.

    Raises :class:`PostgresUnavailable` (with the DSN redacted) if no connection can be made
    within ``connect_timeout`` seconds.
    """
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise PostgresUnavailable(
            "a postgresql:// journal needs the postgres extra: pip install 'emo-async[postgres]'"
        ) from exc
    pool: AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        timeout=connect_timeout,
        # prepare_threshold=None: no server-side prepared statements (PgBouncer-safe).
        kwargs={"autocommit": True, "prepare_threshold": None, "application_name": name},
        configure=_configure,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
    )
    try:
        await pool.open(wait=True, timeout=connect_timeout)
    except (psycopg.Error, psycopg_pool.PoolTimeout):
        await pool.close()
        raise PostgresUnavailable(f"cannot reach PostgreSQL at {redact_dsn(dsn)}") from None
    return pool
