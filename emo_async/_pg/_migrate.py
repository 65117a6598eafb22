"""Numbered schema migrations, applied once per database, safely from many processes at once.

Migrations are the package files ``migrations/NNNN_name.sql``, applied in order, each in its own
transaction together with its row in ``emo_schema_migrations``. A transaction-scoped advisory
lock serialises processes that start together (PgBouncer-safe: no session lock).
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

__all__ = ["MIGRATIONS", "Migration", "migrate"]

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: Any constant shared by every process of the project: the key of the migration lock.
_LOCK_KEY = 0x656D6F5F6D6967  # "emo_mig"


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def _load() -> tuple[Migration, ...]:
    found: list[Migration] = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number: {versions}")
    return tuple(found)


MIGRATIONS: tuple[Migration, ...] = _load()


async def migrate(pool: AsyncConnectionPool[Any]) -> int:
    """Apply every migration the database lacks; return the schema version now in place."""
    async with pool.connection() as conn:
        # Under the lock too: two processes' CREATE TABLE IF NOT EXISTS on a fresh database
        # race, and the loser fails on the catalog's unique index instead of skipping.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS emo_schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
        for mig in MIGRATIONS:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                cur = await conn.execute(
                    "SELECT 1 FROM emo_schema_migrations WHERE version = %s", (mig.version,)
                )
                if await cur.fetchone() is not None:
                    continue
                await conn.execute(mig.sql.encode())
                await conn.execute(
                    "INSERT INTO emo_schema_migrations (version, name) VALUES (%s, %s)",
                    (mig.version, mig.name),
                )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM emo_schema_migrations")
        row = await cur.fetchone()
    return int(row[0]) if row else 0
