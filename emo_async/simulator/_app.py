"""The aiohttp application: the API, upload and media hosts behind one middleware.

Layout: ``_core`` holds the shared :class:`SimState`; ``_middleware`` routes by role and
throws the fault dice; ``_api_host``, ``_upload_host`` and ``_media_host`` answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from ._api_host import ApiHost
from ._config import SimulatorConfig
from ._core import API_PREFIX, SimState
from ._media_host import MediaHost
from ._middleware import Middleware
from ._upload_host import UploadHost

__all__ = ["SIM_KEY", "SimState", "create_app"]

SIM_KEY: Final = web.AppKey("emo_simulator", SimState)


def create_app(config: SimulatorConfig | None = None) -> web.Application:
    """The simulator as one aiohttp application serving the API, upload and media roles.

    Served on a single port, roles are told apart by path: ``/api/v1/...`` is the API,
    ``POST /`` the upload host and ``/results/...`` the media host. :class:`Simulator` serves
    the same application on three ports and tells the roles apart by the local port.

    Args:
        config: The simulated service (defaults to ``SimulatorConfig()``).

    Returns:
        The application; its state is ``app[SIM_KEY]``.
    """
    state = SimState(config or SimulatorConfig())
    api = ApiHost(state)
    middleware = Middleware(state, upload=UploadHost(state).upload, media=MediaHost(state).media)
    app = web.Application(middlewares=[middleware.middleware], client_max_size=8 * 1024 * 1024)
    app[SIM_KEY] = state

    async def resolver_ctx(_app: web.Application) -> AsyncIterator[None]:
        await state.resolver.start()
        yield
        await state.resolver.aclose()

    app.cleanup_ctx.append(resolver_ctx)
    prefix = API_PREFIX
    router = app.router
    router.add_post(f"{prefix}/services/aigc/image2video/face-detect", api.detect)
    router.add_post(f"{prefix}/services/aigc/image2video/video-synthesis", api.submit)
    router.add_post(f"{prefix}/services/aigc/image2video/video-synthesis/", api.submit)
    router.add_get(f"{prefix}/tasks", api.task_list)
    router.add_get(f"{prefix}/tasks/", api.task_list)
    router.add_get(f"{prefix}/tasks/{{task_id}}", api.task_get)
    router.add_post(f"{prefix}/tasks/{{task_id}}/cancel", api.task_cancel)
    router.add_get(f"{prefix}/uploads", api.get_policy)
    return app
