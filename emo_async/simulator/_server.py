"""``Simulator``: the application served on three loopback ports (API, upload, media)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from types import TracebackType

import attrs
from aiohttp import web

from ._app import SIM_KEY, SimState, create_app
from ._clock import SimClock
from ._config import FaultConfig, SimulatorConfig
from ._ledger import Ledger
from ._media_host import result_video
from ._state import TaskSnapshot, TasksView

__all__ = ["Simulator"]


class Simulator:
    """A DashScope EMO simulator running in this event loop.

    ``async with Simulator(SimulatorConfig(...)) as sim:`` listens on three ports of
    ``host`` (port 0 = any free port): the API (``sim.base_url``), the upload host named by
    getPolicy (``sim.upload_host``) and the media host that serves result videos
    (``sim.media_host``). Which listener got a request is recorded in the ledger.

    Args:
        config: The simulated service (defaults to ``SimulatorConfig()``).
        host: Address to listen on; keep it on loopback.
        port: API port (0 = any free port).
        upload_port: Upload host port (0 = any free port).
        media_port: Media host port (0 = any free port).
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        upload_port: int = 0,
        media_port: int = 0,
    ) -> None:
        self._config = config or SimulatorConfig()
        self._host = host
        self._ports = {"api": port, "upload": upload_port, "media": media_port}
        self._app: web.Application = create_app(self._config)
        self._state: SimState = self._app[SIM_KEY]
        self._runner: web.AppRunner | None = None
        self._origins: dict[str, str] = {}

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind the three listeners and start serving."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already running")
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        try:
            for role in ("api", "upload", "media"):
                sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self._host, self._ports[role]))
                port = int(sock.getsockname()[1])
                site = web.SockSite(runner, sock)
                await site.start()
                self._state.port_roles[port] = role
                host = f"[{self._host}]" if ":" in self._host else self._host
                self._origins[role] = f"http://{host}:{port}"
        except BaseException:
            await self.aclose()
            raise
        self._state.hosts.update(self._origins)

    async def aclose(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _origin(self, role: str) -> str:
        if role not in self._origins:
            raise RuntimeError("the simulator is not running")
        return self._origins[role]

    @property
    def base_url(self) -> str:
        """The API base URL, e.g. ``http://127.0.0.1:PORT/api/v1``."""
        return self._origin("api") + "/api/v1"

    @property
    def upload_host(self) -> str:
        """Origin of the OSS-like upload host that getPolicy names."""
        return self._origin("upload")

    @property
    def media_host(self) -> str:
        """Origin of the host that serves result videos."""
        return self._origin("media")

    @property
    def api_key(self) -> str:
        """A key the simulator accepts (``sk-simulator`` unless configured otherwise)."""
        return self._state.default_api_key

    @property
    def config(self) -> SimulatorConfig:
        """The configuration (its ``faults`` are the current ones)."""
        return self._config

    @property
    def app(self) -> web.Application:
        """The served aiohttp application."""
        return self._app

    @property
    def ledger(self) -> Ledger:
        """What the simulator saw and did (the other program's due tasks included)."""
        self._state.other_program.catch_up()
        return self._state.ledger

    @property
    def clock(self) -> SimClock:
        """The simulated clock (``sim.clock.advance(seconds)`` jumps forward)."""
        return self._state.clock

    @property
    def tasks(self) -> Mapping[str, TaskSnapshot]:
        """Task id → snapshot of the task now (read-only)."""
        self._state.other_program.catch_up()
        return TasksView(self._state.store)

    def set_faults(self, faults: FaultConfig) -> None:
        """Swap the fault knobs while running (the dice are reseeded from ``faults.seed``)."""
        self._config = attrs.evolve(self._config, faults=faults)
        self._state.config = self._config
        self._state.set_faults(faults)

    def result_bytes(self, task_id: str) -> bytes:
        """The bytes the media host currently serves for a task's video.

        Raises:
            KeyError: The task does not exist or has not succeeded.
        """
        store = self._state.store
        now = store.catch_up()
        task = store.raw(task_id)
        if task is None or task.status(now) != "SUCCEEDED":
            raise KeyError(task_id)
        return result_video(self._state, task)

    def create_foreign_task(self, audio_seconds: float | None = None) -> str:
        """Create a task now, as another program using the same account and key would.

        It runs, succeeds and is billed like any other, shows in ``GET /tasks`` and
        ``GET /tasks/{id}`` with the same ``api_key_id``, and is named in
        ``ledger.foreign_tasks``.

        Args:
            audio_seconds: Its audio's duration, billed as ``usage.video_duration``; None
                draws one from the seeded 2-8 s range.

        Returns:
            The task id.
        """
        return self._state.create_foreign_task(audio_seconds)
