from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from _media_fixtures import FIXED, FileServer
from aiohttp import web

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
