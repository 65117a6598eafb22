"""The API key stays secret: with DEBUG logging on, a batch full of retries, reconciles and
errors leaves the key in no log record, exception, repr, journal or output file, and the
simulator saw ``Authorization`` only on API-host requests."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

import emo_async
from emo_async import Client, Job, Limits, OutcomeState, PollPolicy, RetryPolicy
from emo_async._samples import make_portrait, make_sample_set, make_voice_wav
from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

KEY = "sk-SECRET-4f9c2e7a1b3d5f60-do-not-leak"
#: Pieces of the key that must not appear either (a truncated key is still a leak).
PIECES = (KEY, KEY[3:], "4f9c2e7a1b3d5f60")
FAST_RETRY = RetryPolicy(attempts=4, wait_initial=0.01, wait_max=0.05)


def leaks(text: str) -> list[str]:
    return [p for p in PIECES if p in text]


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def exception_texts(exc: BaseException) -> list[str]:
    texts = ["".join(traceback.format_exception(exc))]
    for e in exception_chain(exc):
        texts += [str(e), repr(e), repr(e.args), repr(vars(e)) if hasattr(e, "__dict__") else ""]
    return texts


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("emo_async", "aiohttp", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def check_records(caplog: pytest.LogCaptureFixture) -> int:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in caplog.records:
        text = formatter.format(record)  # message, args and any exception text
        assert leaks(text) == [], text
        assert leaks(repr(record.args)) == [], record.args
        assert "Bearer" not in text, text
    return len(caplog.records)


class TestSecrets:
    """The key never leaves the Authorization header of API requests."""

    async def test_batch_under_faults_leaks_nothing(
        self, tmp_path: Path, debug_logs: pytest.LogCaptureFixture
    ) -> None:
        jobs = make_sample_set(tmp_path / "in", 24, portraits=2, seconds=(0.5, 1.0))
        back = make_portrait(tmp_path / "in" / "back.png", trigger="InvalidFile.FrontBody")
        text = tmp_path / "in" / "not-audio.wav"
        text.write_text("not audio\n")
        extra = [
            Job(
                back,
                make_voice_wav(tmp_path / "in" / "b.wav", 0.7),
                name="fails-on-server",
                face_bbox=(100, 100, 300, 300),
                ext_bbox=(0, 0, 400, 400),
            ),
            Job(jobs[0].image, text, name="rejected-locally"),
            Job("file:///etc/passwd", jobs[0].audio, name="bad-url"),
        ]
        faults = FaultConfig(
            seed=11,
            ambiguous_submit_rate=0.2,
            error_rate={"submit": 0.15, "task_get": 0.2, "upload": 0.2, "detect": 0.3},
            reset_rate={"task_get": 0.1, "task_list": 0.1},
            throttle_rate={"task_get": 0.1, "submit": 0.05},
            truncate_rate=0.3,
            retry_after=0.02,
        )
        config = SimulatorConfig(
            api_keys={KEY},
            time_scale=0.002,
            policy_ttl=1e7,
            submit_qps=None,
            detect_qps=None,
            task_qps=None,
            list_qps=None,
            faults=faults,
        )
        out = tmp_path / "out"
        async with Simulator(config) as sim:
            client = Client(
                KEY,
                base_url=sim.base_url,
                retry=FAST_RETRY,
                poll=PollPolicy(target_delay=0.05),
                limits=Limits(task_qps=100, submit_qps=100, detect_qps=100),
            )
            assert leaks(repr(client)) == []
            async with client:
                outcomes = await client.run_batch_all(jobs + extra, out, max_tasks=8)
                assert leaks(repr(client.statistics())) == []
            ledger = sim.ledger
            by_role: dict[str, set[bool]] = {}
            for r in ledger.requests:
                by_role.setdefault(r.role, set()).add(r.authorization)
            assert ledger.auth_leaks() == []
            assert by_role == {"api": {True}, "upload": {False}, "media": {False}}
            # The faults really happened: retries, reconciles and errors were all exercised.
            kinds = {r.fault for r in ledger.requests if r.fault}
            assert {"ambiguous", "error", "reset", "throttle", "truncate"} <= kinds

        states = {o.job.display_name: o.state for o in outcomes}
        # A submit answered 500 may hide a task: with a third of the answers lost around it,
        # the billing rule may leave it unresolved rather than guess.
        assert states["fails-on-server"] in (OutcomeState.FAILED, OutcomeState.UNRESOLVED)
        assert states["rejected-locally"] == OutcomeState.REJECTED
        assert states["bad-url"] == OutcomeState.REJECTED
        not_done = [
            (o.job.display_name, o.state, o.error)
            for o in outcomes
            if o.job in jobs and o.state not in (OutcomeState.DONE, OutcomeState.UNRESOLVED)
        ]
        assert not_done == []
        # Every unresolved outcome's message is as clean as the rest (checked by debug_logs).
        for o in outcomes:
            if o.error is not None:
                assert leaks(o.error.message) == []

        for o in outcomes:
            assert leaks(repr(o)) == [], o
            assert leaks(str(o.error)) == []
            if o.exception is not None:
                for text in exception_texts(o.exception):
                    assert leaks(text) == [], text

        files = [p for p in out.rglob("*") if p.is_file()]
        assert any(p.name.startswith(".emo-journal") for p in files)
        for path in files:
            data = path.read_bytes()
            for piece in PIECES:
                assert piece.encode() not in data, path

        assert check_records(debug_logs) > 50  # DEBUG was really on

    async def test_refused_key_is_not_echoed(
        self, tmp_path: Path, debug_logs: pytest.LogCaptureFixture
    ) -> None:
        async with Simulator(SimulatorConfig(time_scale=0.002)) as sim:
            async with Client(KEY, base_url=sim.base_url, retry=FAST_RETRY) as client:
                with pytest.raises(emo_async.InvalidApiKeyError) as info:
                    await client.get_task("some-task")
                with pytest.raises(emo_async.InvalidApiKeyError):
                    await client.upload(make_voice_wav(tmp_path / "a.wav", 0.5))
        for text in exception_texts(info.value):
            assert leaks(text) == [], text
        check_records(debug_logs)

    async def test_transport_failure_does_not_carry_the_headers(
        self, debug_logs: pytest.LogCaptureFixture
    ) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = f"http://127.0.0.1:{port}/api/v1"  # nothing listens there
        async with Client(KEY, base_url=base, retry=FAST_RETRY) as client:
            with pytest.raises(emo_async.TransportError) as info:
                await client.get_task("t1")
        for text in exception_texts(info.value):
            assert leaks(text) == [], text
        check_records(debug_logs)
