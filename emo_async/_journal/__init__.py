"""The durable batch journal: what was asked, what was sent, what came back.

A crashed or interrupted batch resumes from here without paying twice. The pieces:

- :mod:`.records`: phases, job records, candidate tasks, job keys (no storage);
- :mod:`.protocol`: :class:`JournalStore`, what the batch runner needs from any backend;
- :mod:`.sqlite`: :class:`Journal`, the SQLite backend (with :mod:`.base` and
  :mod:`.unresolved`), on one thread with group commit (:mod:`.connection`), one process at a
  time (:mod:`.lock`), its schema and numbered migrations (:mod:`.schema`);
- :mod:`.summary`: :class:`JournalSummary` and :func:`read_summary` (``emo-async status``).

This package keeps the names ``emo_async._journal`` always had, so callers need not know the
modules.
"""

from __future__ import annotations

from . import connection as _connection
from .base import UPLOAD_MIN_VALIDITY
from .protocol import JournalStore
from .records import Candidate, JobPhase, JobRecord, job_key
from .schema import SCHEMA_NAME, SCHEMA_VERSION
from .sqlite import Journal, open_journal
from .summary import AT_RISK_WINDOW, JournalSummary, UnresolvedJob, read_summary

__all__ = [
    "AT_RISK_WINDOW",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "UPLOAD_MIN_VALIDITY",
    "Candidate",
    "JobPhase",
    "JobRecord",
    "Journal",
    "JournalStore",
    "JournalSummary",
    "UnresolvedJob",
    "job_key",
    "open_journal",
    "read_summary",
]

# The old module's private names that tests reach for (one thread, group commit).
_Connection = _connection.Connection
_Call = _connection._Call
_WRITE = _connection._WRITE
