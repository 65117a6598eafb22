"""A standalone media host for benchmarks: one object of N MiB, served with Range and ETag.

Run ``python -m benchmarks.media_server --size-mb 200 --dir /tmp/x``; it writes the object
(deterministic bytes) to ``--dir``, prints ``READY <port> <sha256>`` on stdout and serves
``GET /video.mp4`` on 127.0.0.1 until killed. aiohttp's ``FileResponse`` answers with
``sendfile``, ``ETag``, ``Last-Modified``, ``Accept-Ranges`` and honours ``Range``/``If-Range``,
like an object store.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
from pathlib import Path

from aiohttp import web

BLOCK = 1 << 20


def write_object(path: Path, size_mb: int, seed: int = 2024) -> str:
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size_mb):
            block = rng.randbytes(BLOCK)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


async def serve(path: Path, sha256: str) -> None:
    async def video(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path, chunk_size=BLOCK, headers={"Content-Type": "video/mp4"})

    app = web.Application()
    app.router.add_get("/video.mp4", video)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"READY {port} {sha256}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    path = args.dir / "video.mp4"
    sha256 = write_object(path, args.size_mb)
    try:
        asyncio.run(serve(path, sha256))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
