"""A web service that turns an uploaded portrait and voice into a talking-portrait video.

One :class:`emo_async.Client` is opened in the app's lifespan and shared by every request, so
all jobs share its rate limits, its poller and its upload and detection caches. Jobs run in a
task group that the lifespan owns: shutting the app down cancels them cleanly.

    POST /jobs              multipart: portrait (image), voice (wav/mp3)[, style_level]
                            -> 202 {"id": ..., "state": "queued"}
    GET  /jobs/{id}         -> {"id", "state", "error", "task_id", "billed_seconds"}
    GET  /jobs/{id}/video   -> the MP4 once the state is "done"

Run it (``pip install fastapi python-multipart uvicorn``)::

    export DASHSCOPE_API_KEY=sk-...
    uvicorn examples.fastapi_app:app

Job records live in memory: a real service would keep them in its database (and could pass a
journal to ``run_batch`` to survive restarts).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import anyio
import anyio.abc
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel

from emo_async import (
    DEFAULT_POLL_POLICY,
    Client,
    DetectionRejectedError,
    EmoError,
    InputError,
    PollPolicy,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
AUDIO_SUFFIXES = {".wav", ".mp3"}
#: DashScope refuses audio of 15 MB or more; portraits are far smaller in practice.
MAX_UPLOAD_BYTES = 15_000_000

State = Literal[
    "queued", "running", "done", "failed", "rejected", "expired", "cancelled", "unresolved"
]


class JobView(BaseModel):
    id: str
    state: State
    error: str | None = None
    task_id: str | None = None
    billed_seconds: float | None = None


class Service:
    """What the lifespan opens: the shared client, the task group and the jobs."""

    def __init__(self, client: Client, tg: anyio.abc.TaskGroup, out_dir: Path) -> None:
        self.client = client
        self.tg = tg
        self.out_dir = out_dir
        self.jobs: dict[str, JobView] = {}
        self.videos: dict[str, Path] = {}

    async def run(self, job_id: str, portrait: Path, voice: Path, style_level: str) -> None:
        view = self.jobs[job_id]
        view.state = "running"
        dest = portrait.parent / "video.mp4"
        try:
            outcome = await self.client.generate(portrait, voice, dest, style_level=style_level)
        except (InputError, DetectionRejectedError) as exc:  # raised before anything is billed
            view.state, view.error = "rejected", str(exc)
            return
        except EmoError as exc:
            view.state, view.error = "failed", str(exc)
            return
        view.state = outcome.state.value
        view.task_id = outcome.task_id
        view.billed_seconds = outcome.billed_seconds
        if outcome.error is not None:
            view.error = f"{outcome.error.kind}: {outcome.error.message}"
        if outcome.path is not None:
            self.videos[job_id] = outcome.path


async def _save(upload: UploadFile, dest_dir: Path, stem: str, allowed: set[str]) -> Path:
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix not in allowed:
        raise HTTPException(422, f"{stem}: expected one of {sorted(allowed)}, got {suffix!r}")
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"{stem}: larger than {MAX_UPLOAD_BYTES} bytes")
    # Our own name, never the client's: the upload's file name only picks the suffix.
    path = dest_dir / f"{stem}{suffix}"
    await anyio.Path(path).write_bytes(data)
    return path


def create_app(
    out_dir: str | os.PathLike[str] = "emo-jobs", *, poll: PollPolicy = DEFAULT_POLL_POLICY
) -> FastAPI:
    """The app; videos and uploads go under ``out_dir``, one folder per job."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        root = Path(out_dir)
        await anyio.Path(root).mkdir(parents=True, exist_ok=True)
        async with Client(poll=poll) as client, anyio.create_task_group() as tg:
            app.state.service = Service(client, tg, root)
            yield
            tg.cancel_scope.cancel()  # shutting down: stop the jobs still running

    app = FastAPI(title="emo_async example", lifespan=lifespan)

    def service(request: Request) -> Service:
        svc: Service = request.app.state.service
        return svc

    @app.post("/jobs", status_code=202)
    async def submit_job(
        request: Request,
        portrait: Annotated[UploadFile, File()],
        voice: Annotated[UploadFile, File()],
        style_level: Annotated[Literal["normal", "calm", "active"], Form()] = "normal",
    ) -> JobView:
        svc = service(request)
        job_id = uuid.uuid4().hex
        job_dir = svc.out_dir / job_id
        await anyio.Path(job_dir).mkdir()
        image = await _save(portrait, job_dir, "portrait", IMAGE_SUFFIXES)
        audio = await _save(voice, job_dir, "voice", AUDIO_SUFFIXES)
        svc.jobs[job_id] = view = JobView(id=job_id, state="queued")
        svc.tg.start_soon(svc.run, job_id, image, audio, style_level)
        return view

    @app.get("/jobs/{job_id}")
    async def get_job(request: Request, job_id: str) -> JobView:
        view = service(request).jobs.get(job_id)
        if view is None:
            raise HTTPException(404, "no such job")
        return view

    @app.get("/jobs/{job_id}/video", response_class=FileResponse)
    async def get_video(request: Request, job_id: str) -> FileResponse:
        svc = service(request)
        if job_id not in svc.jobs:
            raise HTTPException(404, "no such job")
        path = svc.videos.get(job_id)
        if path is None:
            raise HTTPException(409, f"the job is {svc.jobs[job_id].state}, not done")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    return app


app = create_app(os.environ.get("EMO_JOBS_DIR", "emo-jobs"))
