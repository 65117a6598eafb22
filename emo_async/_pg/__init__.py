"""PostgreSQL: the optional backend that lets several processes share one batch and one account.

Nothing here is imported by ``import emo_async``: psycopg is an optional dependency
(``pip install 'emo-async[postgres]'``) loaded only when a ``postgresql://`` DSN is used.

Rules every module of this package keeps:

* No session state. Every connection is in autocommit mode with prepared statements off, and
  every multi-statement step is one explicit transaction, so the backend works behind
  PgBouncer in transaction mode. Locks that must outlive a statement are row locks or
  ``pg_advisory_xact_lock`` inside that transaction, never session advisory locks.
* Time that several processes compare is the server's (``clock_timestamp()``), never a host's.
* A DSN may carry a password: it is never logged, put in a repr or an exception; use
  :func:`redact_dsn`.
"""

from __future__ import annotations

from ._connect import PostgresUnavailable, is_dsn, open_pool, redact_dsn
from ._migrate import MIGRATIONS, migrate

__all__ = ["MIGRATIONS", "PostgresUnavailable", "is_dsn", "migrate", "open_pool", "redact_dsn"]
