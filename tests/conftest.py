from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from _media_fixtures import FIXED, FileServer
from aiohttp import web

from emo_async._pg.testing import PostgresNotInstalled, TempPostgres
from emo_async.simulator import Simulator


@pytest.fixture
def anyio_backend() -> str:
    # aiohttp is asyncio-only.
    return "asyncio"


@pytest.fixture
async def files() -> AsyncIterator[FileServer]:
    """A loopback HTTP server publishing test media (``files.add(name, bytes) -> url``)."""
    server = FileServer()

    async def handler(request: web.Request) -> web.Response:
        server.hits += 1
        data = server.files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.origin = f"http://{host}:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """An in-process simulator with fixed processing times (the simulator tests' default).

    time_scale=1: real time barely moves during a test, so ``clock.advance()`` drives it.
    """
    async with Simulator(FIXED) as simulator:
        yield simulator


# -- PostgreSQL: one throwaway server per test process, one fresh database per test -----------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TempPostgres]:
    """A real PostgreSQL server in a temporary folder (initdb + pg_ctl, as ``postgres`` when
    the tests run as root). Skips when the server programs are missing, unless
    ``EMO_ASYNC_REQUIRE_POSTGRES=1`` (set by ``.ci/run``): then it fails."""
    try:
        server = TempPostgres.start()
    except PostgresNotInstalled:
        if os.environ.get("EMO_ASYNC_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip("PostgreSQL is not installed")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(pg_server: TempPostgres) -> str:
    """The DSN of an empty database of its own for this test."""
    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
