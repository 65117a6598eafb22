"""Hostile input: every case of the corpus in ``tests/hostile`` gets a specific error that names
the job and the problem, and in a batch the other jobs still finish.

``tests/hostile/cases.json`` lists the cases (one per line: the job's inputs and the expected
field and message fragment); ``tests/hostile/files`` holds the small files they use, written by
``tests/hostile/make_corpus.py``. Files too big to commit are made here, in ``tmp_path``.
Hostile *servers* (answers that are not JSON, huge, or miss fields; redirects to ``file://``)
are small scripted aiohttp servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import sys
import types
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import emo_async
from emo_async import (
    Client,
    InputError,
    Job,
    Limits,
    OutcomeState,
    PollPolicy,
    RetryPolicy,
    validate_job,
)
from emo_async._manifest import ManifestError, open_manifest
from emo_async._names import OutputNames
from emo_async._samples import make_voice_wav
from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

HOSTILE = Path(__file__).resolve().parent / "hostile"
FILES = HOSTILE / "files"
CASES: dict[str, Any] = json.loads((HOSTILE / "cases.json").read_text())
JOB_CASES: list[dict[str, Any]] = CASES["jobs"]
MANIFEST_CASES: list[dict[str, Any]] = CASES["manifests"]
BAD_CASES = [c for c in JOB_CASES if "field" in c["expect"]]
NAME_CASES = [c for c in JOB_CASES if "stem" in c["expect"]]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
FAST_RETRY = RetryPolicy(attempts=3, wait_initial=0.01, wait_max=0.05)
FACE, EXT = (100, 100, 300, 300), (0, 0, 400, 400)


def _ids(cases: list[dict[str, Any]]) -> list[str]:
    return [c["id"] for c in cases]


@pytest.fixture
def specials(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """The inputs that cannot be committed: a directory, a missing file, a FIFO, a symlink
    loop and an unreadable file."""
    base = tmp_path / "specials"
    base.mkdir()
    (base / "a-directory").mkdir()
    fifo = base / "a-fifo.wav"
    os.mkfifo(fifo)
    loop = base / "loop.png"
    loop.symlink_to(base / "loop.png")
    unreadable = base / "unreadable.wav"
    unreadable.write_bytes((FILES / "voice.wav").read_bytes())
    unreadable.chmod(0)
    yield {
        "@dir": base / "a-directory",
        "@missing": base / "no-such-file.png",
        "@fifo": fifo,
        "@loop": loop,
        "@unreadable": unreadable,
    }
    unreadable.chmod(0o600)


def _source(value: str, specials: dict[str, Path]) -> str | Path:
    if value.startswith("@"):
        return specials[value]
    if value == "" or value.isspace() or ":" in value:
        return value  # a URL (or an empty string): exactly as written
    return FILES / value


def job_of(case: dict[str, Any], specials: dict[str, Path], **override: Any) -> Job:
    kw: dict[str, Any] = {
        k: case[k] for k in ("style_level", "ratio", "face_bbox", "ext_bbox") if k in case
    }
    kw.update(override)
    return Job(
        override.pop("image", None) or _source(case["image"], specials),
        override.pop("audio", None) or _source(case["audio"], specials),
        name=case.get("name", case["id"]),
        **{k: v for k, v in kw.items() if k not in ("image", "audio")},
    )


def assert_problem(exc: InputError, case: dict[str, Any], name: str | None = None) -> None:
    """The error names the job and has the expected problem (field and message)."""
    field, fragment = case["expect"]["field"], case["expect"]["message"]
    shown = [(p.field, p.message) for p in exc.problems]
    assert any(p.field == field and fragment in p.message for p in exc.problems), shown
    job_name = name if name is not None else case["id"]
    assert exc.job_name == job_name
    assert str(exc).startswith(f"job {job_name!r}: ")


class TestCorpus:
    """The corpus is real: files on disk, many cases, small."""

    def test_has_at_least_forty_cases(self) -> None:
        assert len(JOB_CASES) + len(MANIFEST_CASES) >= 40
        assert len(BAD_CASES) >= 40
        assert len(set(_ids(JOB_CASES + MANIFEST_CASES))) == len(JOB_CASES + MANIFEST_CASES)

    def test_every_case_file_exists_and_every_file_is_used(self) -> None:
        used = set()
        for case in JOB_CASES:
            for key in ("image", "audio"):
                value = case[key]
                if value and not value.startswith("@") and ":" not in value and value.strip():
                    assert (FILES / value).is_file(), value
                    used.add(value)
        for case in MANIFEST_CASES:
            assert (HOSTILE / "manifests" / case["file"]).is_file()
        assert {p.name for p in FILES.iterdir()} == used

    def test_folder_stays_small(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The folder holds exactly what ``make_corpus.py`` writes (with ``cases.json`` and the
        script), every file is small, and the big inputs (a 15 MB WAV, a 60 s WAV) are made by
        the tests in ``tmp_path``, not committed."""
        # Run the generator into tmp_path (exec, not import: no __pycache__ in the folder).
        script = HOSTILE / "make_corpus.py"
        corpus = types.ModuleType("make_corpus")
        corpus.__file__ = str(script)
        monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds the repo root
        exec(compile(script.read_text(), str(script), "exec"), corpus.__dict__)
        monkeypatch.setattr(corpus, "FILES", tmp_path / "files")
        monkeypatch.setattr(corpus, "MANIFESTS", tmp_path / "manifests")
        (tmp_path / "files").mkdir()
        corpus.images()
        corpus.audio()
        corpus.manifests()
        made = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}

        sizes = {
            p.relative_to(HOSTILE).as_posix(): p.stat().st_size
            for p in HOSTILE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        assert set(sizes) - {"cases.json", "make_corpus.py"} == made
        largest = max(sizes, key=sizes.__getitem__)
        assert sizes[largest] <= 64 * 1024, (largest, sizes[largest])
        assert sum(sizes.values()) < 1_000_000


class TestValidation:
    """Each hostile job is refused locally, before any request, with its own reason."""

    @pytest.mark.parametrize("case", BAD_CASES, ids=_ids(BAD_CASES))
    async def test_case_gets_its_specific_error(
        self, case: dict[str, Any], specials: dict[str, Path]
    ) -> None:
        if case["id"] == "audio-unreadable" and IS_ROOT:
            pytest.skip("root reads files whatever their mode")
        with pytest.raises(InputError) as info:
            await validate_job(job_of(case, specials))
        assert_problem(info.value, case)

    @pytest.mark.parametrize(
        "case",
        [c for c in JOB_CASES if "field" not in c["expect"]],
        ids=_ids([c for c in JOB_CASES if "field" not in c["expect"]]),
    )
    async def test_disguised_but_valid_input_is_accepted(
        self, case: dict[str, Any], specials: dict[str, Path]
    ) -> None:
        validated = await validate_job(job_of(case, specials))
        if case["id"] == "png-named-jpg-is-accepted-as-png":
            assert validated.image.image is not None
            assert validated.image.image.format == "png"

    async def test_every_problem_of_a_job_is_reported_at_once(self, tmp_path: Path) -> None:
        job = Job(
            FILES / "side-399.png",
            FILES / "text-named.wav",
            name="all-wrong",
            style_level="loud",
            ratio="2:1",
        )
        with pytest.raises(InputError) as info:
            await validate_job(job)
        assert {p.field for p in info.value.problems} == {"image", "audio", "style_level", "ratio"}


def _wav(path: Path, *, frames: int, rate: int, width: int = 2) -> Path:
    header = b"RIFF" + struct.pack("<I", 36 + frames * width) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * width, width, width * 8)
    header += b"data" + struct.pack("<I", frames * width)
    with path.open("wb") as f:
        f.write(header)
        f.truncate(len(header) + frames * width)  # silence, written sparsely
    return path


class TestBoundaries:
    """Each documented limit, one step on each side (files made at test time)."""

    @pytest.mark.parametrize(
        ("seconds", "ok"), [(59.9, True), (59.999, True), (60.0, False), (61.0, False)]
    )
    async def test_audio_duration_limit(self, tmp_path: Path, seconds: float, ok: bool) -> None:
        audio = _wav(tmp_path / "long.wav", frames=round(seconds * 8000), rate=8000, width=1)
        job = Job(FILES / "portrait.png", audio, name=f"dur-{seconds}")
        if ok:
            assert (await validate_job(job)).billed_seconds_estimate == pytest.approx(seconds)
            return
        with pytest.raises(InputError) as info:
            await validate_job(job)
        case = {"expect": {"field": "audio", "message": "is too long"}}
        assert_problem(info.value, case, name=f"dur-{seconds}")
        assert any("< 60 s" == p.limit for p in info.value.problems)

    @pytest.mark.parametrize(("size", "ok"), [(14_999_998, True), (15_000_000, False)])
    async def test_audio_size_limit(self, tmp_path: Path, size: int, ok: bool) -> None:
        # 192 kHz mono 16-bit: 15 MB is 39 s, under the duration limit.
        audio = _wav(tmp_path / "big.wav", frames=(size - 44) // 2, rate=192_000)
        assert audio.stat().st_size == size
        job = Job(FILES / "portrait.png", audio, name=f"size-{size}")
        if ok:
            await validate_job(job)
            return
        with pytest.raises(InputError) as info:
            await validate_job(job)
        case = {"expect": {"field": "audio", "message": "size 15,000,000 bytes is too large"}}
        assert_problem(info.value, case, name=f"size-{size}")


class TestOutputNames:
    """Hostile job names never put a file outside ``out_dir``."""

    @pytest.mark.parametrize("case", NAME_CASES, ids=_ids(NAME_CASES))
    def test_name_is_made_safe(self, case: dict[str, Any], tmp_path: Path) -> None:
        out = tmp_path / "out"
        out.mkdir()
        path = OutputNames(out).assign(case["name"], "k" * 64)
        assert path.parent == out
        assert os.path.realpath(path).startswith(os.path.realpath(out) + os.sep)
        expected = case["expect"]["stem"] or "k" * 64
        assert path.name == expected + ".mp4"
        assert "\x00" not in path.name
        assert all(ch.isprintable() for ch in path.name)

    def test_symlink_out_of_out_dir_is_refused(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        out.mkdir()
        (out / "evil.mp4").symlink_to(tmp_path / "elsewhere.mp4")
        with pytest.raises(emo_async.DownloadError, match="outside"):
            OutputNames(out).assign("evil", "k" * 64)


class TestManifests:
    """Manifest-level hostility: a clear error for the file, or per row."""

    @pytest.mark.parametrize("case", MANIFEST_CASES, ids=_ids(MANIFEST_CASES))
    def test_manifest_case(self, case: dict[str, Any]) -> None:
        path = HOSTILE / "manifests" / case["file"]
        expect = case["expect"]
        if "error" in expect:
            with pytest.raises(ManifestError, match=re.escape(expect["message"])) as info:
                list(open_manifest(path))
            assert case["file"] in str(info.value)
            return
        rows = list(open_manifest(path))
        assert len(rows) == len(expect["rows"])
        for row, (number, what, text) in zip(rows, expect["rows"], strict=True):
            assert row.row == number
            if what == "ok":
                assert row.job is not None, row.problems
                assert row.job.display_name == text
            else:
                assert row.job is None
                assert any(p.field == what and text in p.message for p in row.problems), (
                    row.problems
                )


# --------------------------------------------------------------------------------------------
# Redirects to other schemes.


@attrs.define
class Origin:
    """A loopback aiohttp server with a request log."""

    server: TestServer
    hits: list[tuple[str, str, bool]] = attrs.field(factory=list)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


async def _serve(
    routes: Callable[[Origin], web.Application],
) -> AsyncIterator[Origin]:
    holder: list[Origin] = []

    @web.middleware
    async def log(request: web.Request, handler: Any) -> web.StreamResponse:
        holder[0].hits.append((request.method, request.path_qs, "Authorization" in request.headers))
        result: web.StreamResponse = await handler(request)
        return result

    origin = Origin(TestServer(web.Application(), host="127.0.0.1"))
    holder.append(origin)
    app = routes(origin)
    app.middlewares.append(log)
    origin.server = TestServer(app, host="127.0.0.1")
    await origin.server.start_server()
    try:
        yield origin
    finally:
        await origin.server.close()


@pytest.fixture
async def redirector() -> AsyncIterator[Origin]:
    """Serves /to-file (302 to file:///etc/passwd), /to-ftp and the corpus files."""

    def routes(origin: Origin) -> web.Application:
        async def to_file(request: web.Request) -> web.Response:
            raise web.HTTPFound("file:///etc/passwd")

        async def to_ftp(request: web.Request) -> web.Response:
            raise web.HTTPFound("ftp://127.0.0.1/voice.wav")

        async def file(request: web.Request) -> web.Response:
            return web.Response(body=(FILES / request.match_info["name"]).read_bytes())

        app = web.Application()
        app.router.add_route("*", "/to-file/{tail:.*}", to_file)
        app.router.add_route("*", "/to-ftp/{tail:.*}", to_ftp)
        app.router.add_get("/files/{name}", file)
        return app

    async for origin in _serve(routes):
        yield origin


class TestRedirects:
    """A URL that redirects to another scheme is refused, never followed."""

    @pytest.mark.parametrize("kind", ["to-file", "to-ftp"])
    async def test_url_check_refuses_the_redirect(self, redirector: Origin, kind: str) -> None:
        job = Job(
            redirector.url(f"/{kind}/portrait.png"),
            redirector.url(f"/{kind}/voice.wav"),
            name=f"redirect-{kind}",
        )
        async with aiohttp.ClientSession() as session:
            with pytest.raises(InputError) as info:
                await validate_job(job, check_urls=True, session=session)
        problems = info.value.problems
        assert {p.field for p in problems} == {"image", "audio"}
        for p in problems:
            assert "is unreachable" in p.message
            assert (
                "redirect" in p.message.lower() or "ftp://" in p.message or "file://" in (p.message)
            ), p.message
        assert info.value.job_name == f"redirect-{kind}"

    async def test_simulator_refuses_to_follow_it(self, redirector: Origin, tmp_path: Path) -> None:
        good = make_voice_wav(tmp_path / "good.wav", 1.0, seed=5)
        jobs = [
            Job(redirector.url("/to-file/portrait.png"), FILES / "voice.wav", name="via-detect"),
            Job(
                redirector.url("/to-file/portrait2.png"),
                FILES / "voice.wav",
                name="via-submit",
                face_bbox=FACE,
                ext_bbox=EXT,
            ),
            Job(FILES / "portrait.png", good, name="good"),
        ]
        config = SimulatorConfig(time_scale=0.002, policy_ttl=1e7, detect_qps=None)
        async with Simulator(config) as sim:
            async with Client(sim.api_key, base_url=sim.base_url, retry=FAST_RETRY) as client:
                outcomes = await client.run_batch_all(jobs, tmp_path / "out")
            by_name = {o.job.display_name: o for o in outcomes}
            assert by_name["good"].state == OutcomeState.DONE
            for name in ("via-detect", "via-submit"):
                o = by_name[name]
                assert o.state in (OutcomeState.REJECTED, OutcomeState.FAILED), o
                assert o.error is not None
                assert o.error.kind == "InvalidURLError", o.error
            assert len(sim.ledger.tasks_created) == 1
        # The simulator asked once per URL and did not follow the redirect.
        fetched = [path for _, path, _ in redirector.hits]
        assert sorted(fetched) == ["/to-file/portrait.png", "/to-file/portrait2.png"]


# --------------------------------------------------------------------------------------------
# Hostile servers.

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64


@attrs.define
class HostileApi:
    """A scripted DashScope look-alike whose answers depend on the job (its audio URL stem)."""

    api: Origin
    media: Origin
    counts: dict[str, int] = attrs.field(factory=dict)
    submits: dict[str, int] = attrs.field(factory=dict)

    @property
    def base_url(self) -> str:
        return self.api.url("/api/v1")


def _task_body(task_id: str, status: str, **output: Any) -> dict[str, Any]:
    return {
        "request_id": f"r-{task_id}",
        "output": {"task_id": task_id, "task_status": status, **output},
        "usage": {"video_duration": 1.0},
    }


@pytest.fixture
async def hostile_api() -> AsyncIterator[HostileApi]:
    holder: list[HostileApi] = []

    def media_routes(origin: Origin) -> web.Application:
        async def video(request: web.Request) -> web.Response:
            return web.Response(body=VIDEO, headers={"ETag": '"v1"'}, content_type="video/mp4")

        app = web.Application()
        app.router.add_get("/v/{name}", video)
        return app

    def api_routes(origin: Origin) -> web.Application:
        def html() -> web.Response:
            return web.Response(
                text="<html><body>502 Bad Gateway</body></html>",
                status=200,
                content_type="text/html",
            )

        async def submit(request: web.Request) -> web.StreamResponse:
            s = holder[0]
            body = await request.json()
            label = body["input"]["audio_url"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
            s.submits[label] = s.submits.get(label, 0) + 1
            if label == "submit-not-json":
                return html()
            if label == "no-task-id":
                return web.json_response({"request_id": "r1", "output": {"task_status": "PENDING"}})
            return web.json_response(_task_body(f"t-{label}", "PENDING"))

        async def detect(request: web.Request) -> web.StreamResponse:
            return web.json_response([{"check_pass": True}])

        async def task(request: web.Request) -> web.StreamResponse:
            s = holder[0]
            task_id = request.match_info["task_id"]
            label = task_id.removeprefix("t-")
            n = s.counts[label] = s.counts.get(label, 0) + 1
            ok = _task_body(
                task_id, "SUCCEEDED", results={"video_url": s.media.url(f"/v/{label}.mp4")}
            )
            if label == "not-json-then-ok" and n <= 2:
                return html()
            if label == "huge-then-ok" and n <= 1:
                padding = "x" * (9 * 1024 * 1024)
                return web.json_response({**ok, "padding": padding})
            if label == "unknown-status-then-ok" and n <= 2:
                return web.json_response(_task_body(task_id, "WARMING"))
            if label == "missing-fields-then-ok" and n <= 2:
                return web.json_response({"request_id": "r-missing"})
            if label == "split-answer":
                # A valid answer that arrives in pieces, as it does over a real network.
                data = json.dumps(ok).encode()
                resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                resp.content_length = len(data)
                await resp.prepare(request)
                for i in range(0, len(data), 40):
                    await resp.write(data[i : i + 40])
                    await asyncio.sleep(0.005)
                await resp.write_eof()
                return resp
            if label == "video-file-url":
                return web.json_response(
                    _task_body(task_id, "SUCCEEDED", results={"video_url": "file:///etc/passwd"})
                )
            if label == "video-on-api-host":
                url = origin.url(f"/v/{label}.mp4")
                return web.json_response(
                    _task_body(task_id, "SUCCEEDED", results={"video_url": url})
                )
            return web.json_response(ok)

        async def task_list(request: web.Request) -> web.StreamResponse:
            return html()

        app = web.Application()
        app.router.add_post("/api/v1/services/aigc/image2video/video-synthesis/", submit)
        app.router.add_post("/api/v1/services/aigc/image2video/face-detect", detect)
        app.router.add_get("/api/v1/tasks/{task_id}", task)
        app.router.add_get("/api/v1/tasks", task_list)
        return app

    async for media in _serve(media_routes):
        async for api in _serve(api_routes):
            holder.append(HostileApi(api, media))
            yield holder[0]


def _url_job(api: HostileApi, label: str, *, boxes: bool = True) -> Job:
    # The inputs are never fetched by this server; only their names matter.
    kw: dict[str, Any] = {"face_bbox": FACE, "ext_bbox": EXT} if boxes else {}
    return Job(
        f"http://127.0.0.1:9/{label}.png", f"http://127.0.0.1:9/{label}.wav", name=label, **kw
    )


def _hostile_client(api: HostileApi) -> Client:
    return Client(
        "sk-hostile-test",
        base_url=api.base_url,
        retry=FAST_RETRY,
        poll=PollPolicy(target_delay=0.05, fallback_interval=0.2, prior_base=0.05),
        limits=Limits(task_qps=200, submit_qps=200, detect_qps=200),
    )


class TestHostileServer:
    """Answers that are not JSON, huge, or miss fields: a specific error, never a crash."""

    async def test_answer_in_pieces_is_read_whole(self, hostile_api: HostileApi) -> None:
        async with _hostile_client(hostile_api) as client:
            task = await client.get_task("t-split-answer")
        assert task.status == emo_async.TaskStatus.SUCCEEDED
        assert hostile_api.counts["split-answer"] == 1

    async def test_not_json_is_a_server_error(self, hostile_api: HostileApi) -> None:
        hostile_api.counts["not-json-then-ok"] = -5  # every answer in this test is HTML
        async with _hostile_client(hostile_api) as client:
            with pytest.raises(emo_async.ServerError, match="not JSON") as info:
                await client.get_task("t-not-json-then-ok")
        assert "502 Bad Gateway" in str(info.value)

    async def test_huge_answer_is_refused_not_buffered(self, hostile_api: HostileApi) -> None:
        hostile_api.counts["huge-then-ok"] = -5  # every answer in this test is the huge one
        async with _hostile_client(hostile_api) as client:
            with pytest.raises(emo_async.ServerError, match="too large"):
                await client.get_task("t-huge-then-ok")

    async def test_missing_fields_are_not_a_verdict(self, hostile_api: HostileApi) -> None:
        async with _hostile_client(hostile_api) as client:
            task = await client.get_task("t-missing-fields-then-ok")
        # No status is a malformed answer: never taken as "finished" (a billed task must not
        # be written off on a glitch).
        assert task.task_id == "t-missing-fields-then-ok"
        assert not task.status.is_terminal
        assert not task.status.is_known

    async def test_submit_without_task_id_is_an_api_error(self, hostile_api: HostileApi) -> None:
        async with _hostile_client(hostile_api) as client:
            with pytest.raises(emo_async.AmbiguousSubmitError, match="no task id"):
                await client.submit(
                    "http://127.0.0.1:9/a.png",
                    "http://127.0.0.1:9/no-task-id.wav",
                    face_bbox=FACE,
                    ext_bbox=EXT,
                )

    async def test_not_json_submit_is_ambiguous_and_sent_once(
        self, hostile_api: HostileApi
    ) -> None:
        async with _hostile_client(hostile_api) as client:
            with pytest.raises(emo_async.AmbiguousSubmitError, match="may have been created"):
                await client.submit(
                    "http://127.0.0.1:9/a.png",
                    "http://127.0.0.1:9/submit-not-json.wav",
                    face_bbox=FACE,
                    ext_bbox=EXT,
                )
        assert hostile_api.submits["submit-not-json"] == 1

    async def test_detection_answer_that_is_a_list(self, hostile_api: HostileApi) -> None:
        async with _hostile_client(hostile_api) as client:
            with pytest.raises(emo_async.ServerError, match="not JSON"):
                await client.detect("http://127.0.0.1:9/a.png")

    async def test_batch_turns_each_into_that_jobs_outcome(
        self, hostile_api: HostileApi, tmp_path: Path
    ) -> None:
        expected: dict[str, tuple[OutcomeState, str | None, str | None]] = {
            "good-1": (OutcomeState.DONE, None, None),
            "good-2": (OutcomeState.DONE, None, None),
            "not-json-then-ok": (OutcomeState.DONE, None, None),
            "huge-then-ok": (OutcomeState.DONE, None, None),
            "split-answer": (OutcomeState.DONE, None, None),
            "unknown-status-then-ok": (OutcomeState.DONE, None, None),
            "missing-fields-then-ok": (OutcomeState.DONE, None, None),
            # An answer without a task id, or not JSON, may hide a task: the list (this
            # server's is broken) proves nothing, so these are unresolved, never resent.
            "no-task-id": (OutcomeState.UNRESOLVED, "UnresolvedSubmitError", "settled"),
            "submit-not-json": (OutcomeState.UNRESOLVED, "UnresolvedSubmitError", "settled"),
            "video-file-url": (OutcomeState.FAILED, "DownloadError", "not an http(s) URL"),
            "video-on-api-host": (OutcomeState.FAILED, "DownloadError", "API"),
            "detect-list": (OutcomeState.FAILED, "ServerError", "not JSON"),
        }
        jobs = [_url_job(hostile_api, label, boxes=label != "detect-list") for label in expected]
        async with _hostile_client(hostile_api) as client:
            outcomes = await client.run_batch_all(jobs, tmp_path / "out", max_tasks=4)
        by_name = {o.job.display_name: o for o in outcomes}
        assert sorted(by_name) == sorted(expected)
        for name, (state, kind, fragment) in expected.items():
            o = by_name[name]
            assert o.state == state, (name, o.error)
            if state == OutcomeState.DONE:
                assert o.path is not None
                assert o.path.read_bytes() == VIDEO
                continue
            assert o.error is not None, name
            assert o.error.kind == kind, (name, o.error)
            assert fragment is not None
            assert fragment.lower() in o.error.message.lower(), (name, o.error.message)
        # The unanswered submit was never resent blindly; the API host never served a video.
        assert hostile_api.submits["submit-not-json"] == 1
        assert hostile_api.submits["no-task-id"] == 1
        assert not [h for h in hostile_api.api.hits if h[1].startswith("/v/")]
        assert not [h for h in hostile_api.media.hits if h[2]]


# --------------------------------------------------------------------------------------------
# Everything bad at once, with a few good jobs.


class TestMixedBatch:
    """A batch of every bad job and a few good ones: each bad job is rejected with its own
    error, nothing is billed for it, and the good ones finish."""

    async def test_bad_jobs_are_rejected_and_good_ones_finish(
        self, specials: dict[str, Path], tmp_path: Path
    ) -> None:
        jobs: list[Job] = []
        voices = tmp_path / "voices"
        voices.mkdir()
        good: list[str] = []
        for i, case in enumerate(JOB_CASES):
            if case["id"] == "audio-unreadable" and IS_ROOT:
                continue
            job = job_of(case, specials)
            if "field" not in case["expect"] and case["audio"] == "voice.wav":
                # Distinct voices: identical inputs would be one task on the server's books.
                voice = make_voice_wav(voices / f"v{i}.wav", 0.5, seed=100 + i)
                job = attrs.evolve(job, audio=voice)
            if "field" not in case["expect"]:
                good.append(job.display_name)
            jobs.append(job)
        config = SimulatorConfig(
            time_scale=0.002,
            policy_ttl=1e7,
            detect_qps=None,
            submit_qps=None,
            task_qps=None,
            list_qps=None,
        )
        out = tmp_path / "out"
        async with Simulator(config) as sim:
            async with Client(
                sim.api_key,
                base_url=sim.base_url,
                retry=FAST_RETRY,
                poll=PollPolicy(target_delay=0.05),
                limits=Limits(task_qps=100, submit_qps=100, detect_qps=100),
            ) as client:
                outcomes = await client.run_batch_all(jobs, out, max_tasks=10)
            assert len(sim.ledger.tasks_created) == len(good)
            assert sim.ledger.duplicate_tasks() == {}
            assert sim.ledger.auth_leaks() == []
        assert len(outcomes) == len(jobs)
        by_name = {o.job.display_name: o for o in outcomes}
        assert len(by_name) == len(jobs)
        for case in JOB_CASES:
            name = case.get("name", case["id"])
            if name not in by_name:
                continue
            o = by_name[name]
            if "field" not in case["expect"]:
                assert o.state == OutcomeState.DONE, (name, o.error)
                assert o.path is not None
                assert o.path.parent == out
                stem = case["expect"].get("stem")
                if stem:
                    assert o.path.name == stem + ".mp4"
                continue
            assert o.state == OutcomeState.REJECTED, (name, o.state, o.error)
            assert o.task_id is None
            assert isinstance(o.exception, InputError), (name, o.exception)
            assert_problem(o.exception, case, name=name)
        # Every file the batch wrote is inside out_dir, and nothing else was written.
        expected = sorted(p.name for n in good if (p := by_name[n].path) is not None)
        assert _videos_under(tmp_path) == [f"out/{name}" for name in expected]


def _videos_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.mp4"))
