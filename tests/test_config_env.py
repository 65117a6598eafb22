"""Configuration from the environment, with the official SDK's names: one test per variable,
the key file, and the precedence (explicit > 2.x > legacy > key file > default). Each setting
is proved by what happens at the simulator on 127.0.0.1, not by an attribute alone."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest

import emo_async
from emo_async import DEFAULT_RETRY_POLICY, Client, RetryPolicy, Timeouts
from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

SIM_KEY = "sk-env-0123456789abcdef"
VARIABLES = (
    "DASHSCOPE_API_KEY",
    "DASHSCOPE_API_KEY_FILE_PATH",
    "DASHSCOPE_BASE_URL",
    "DASHSCOPE_HTTP_BASE_URL",
    "DASHSCOPE_WORKSPACE",
    "DASHSCOPE_TIMEOUT",
    "DASHSCOPE_MAX_RETRIES",
    "DASHSCOPE_LOG",
    "DASHSCOPE_LOGGING_LEVEL",
)
DEAD_URL = "http://127.0.0.1:9/api/v1"  # discard port: nothing listens


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DASHSCOPE_* variable, and a HOME of our own (its ~/.dashscope is empty)."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def logger_level() -> Iterator[None]:
    # DASHSCOPE_LOG sets the package logger's level; other tests must not inherit it.
    log = logging.getLogger("emo_async")
    before = log.level
    log.setLevel(logging.NOTSET)
    yield
    log.setLevel(before)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(api_keys={SIM_KEY}, workspace=None)) as simulator:
        yield simulator


def write_key(path: Path, key: str = SIM_KEY) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n", encoding="utf-8")
    return path


async def works(client: Client) -> bool:
    """One task query through ``client``: True when the simulator accepted it."""
    async with client:
        try:
            await client.get_task("t-1")
        except emo_async.EmoError:
            return False
    return True


class TestApiKey:
    """The key: argument, ``DASHSCOPE_API_KEY``, then the key file."""

    async def test_from_the_variable(self, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DASHSCOPE_API_KEY", SIM_KEY)
        assert await works(Client(base_url=sim.base_url))

    async def test_from_the_default_key_file(self, sim: Simulator, clean_env: Path) -> None:
        write_key(clean_env / ".dashscope" / "api_key")
        assert await works(Client(base_url=sim.base_url))

    async def test_from_the_file_the_variable_names(
        self, sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: Path
    ) -> None:
        write_key(clean_env / ".dashscope" / "api_key", "sk-not-this-one")
        path = write_key(tmp_path / "keys" / "mine")
        monkeypatch.setenv("DASHSCOPE_API_KEY_FILE_PATH", str(path))
        assert await works(Client(base_url=sim.base_url))

    async def test_file_path_may_use_a_tilde(
        self, sim: Simulator, monkeypatch: pytest.MonkeyPatch, clean_env: Path
    ) -> None:
        write_key(clean_env / "k")
        monkeypatch.setenv("DASHSCOPE_API_KEY_FILE_PATH", "~/k")
        assert await works(Client(base_url=sim.base_url))

    async def test_precedence(
        self, sim: Simulator, monkeypatch: pytest.MonkeyPatch, clean_env: Path
    ) -> None:
        write_key(clean_env / ".dashscope" / "api_key", "sk-from-file")
        monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-from-env")
        # The argument beats the variable, which beats the file.
        assert await works(Client(SIM_KEY, base_url=sim.base_url))
        assert not await works(Client(base_url=sim.base_url, retry=RetryPolicy(attempts=1)))
        monkeypatch.setenv("DASHSCOPE_API_KEY", SIM_KEY)
        write_key(clean_env / ".dashscope" / "api_key", "sk-from-file")
        assert await works(Client(base_url=sim.base_url))
        monkeypatch.delenv("DASHSCOPE_API_KEY")
        assert not await works(Client(base_url=sim.base_url, retry=RetryPolicy(attempts=1)))
        write_key(clean_env / ".dashscope" / "api_key")
        assert await works(Client(base_url=sim.base_url))

    def test_no_key_anywhere_is_a_clear_error(self) -> None:
        with pytest.raises(ValueError, match=r"DASHSCOPE_API_KEY.*~/.dashscope/api_key"):
            Client()

    def test_a_named_file_that_is_missing_is_an_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DASHSCOPE_API_KEY_FILE_PATH", str(tmp_path / "nope"))
        with pytest.raises(ValueError, match="does not exist"):
            Client()

    def test_a_file_with_more_than_a_key_is_refused_without_quoting_it(
        self, clean_env: Path
    ) -> None:
        write_key(clean_env / ".dashscope" / "api_key", "sk-secret-part # my key")
        with pytest.raises(ValueError, match="more than one word") as info:
            Client()
        assert "sk-secret-part" not in str(info.value)

    async def test_a_key_from_a_file_is_never_logged_nor_shown(
        self, sim: Simulator, clean_env: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        path = write_key(clean_env / ".dashscope" / "api_key")
        client = Client(base_url=sim.base_url)
        texts = [repr(client)]
        async with client:
            await client.get_task("t-1")
            texts += [repr(client), repr(client.statistics())]
        texts += [r.getMessage() for r in caplog.records]
        assert any(str(path) in t for t in texts)  # where it came from is said...
        assert not any(SIM_KEY in t for t in texts)  # ...what it is, never
        assert not any(SIM_KEY[-6:] in t for t in texts)


class TestBaseURL:
    """``DASHSCOPE_BASE_URL`` (2.x) before ``DASHSCOPE_HTTP_BASE_URL`` (1.x)."""

    async def test_2x_variable(self, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DASHSCOPE_BASE_URL", sim.base_url)
        assert await works(Client(SIM_KEY))
        assert sim.ledger.count("task_get") == 1

    async def test_legacy_variable(self, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", sim.base_url)
        assert await works(Client(SIM_KEY))
        assert sim.ledger.count("task_get") == 1

    async def test_precedence(self, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
        one_try = RetryPolicy(attempts=1)
        monkeypatch.setenv("DASHSCOPE_BASE_URL", sim.base_url)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", DEAD_URL)
        assert await works(Client(SIM_KEY, retry=one_try))
        monkeypatch.setenv("DASHSCOPE_BASE_URL", DEAD_URL)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", sim.base_url)
        assert not await works(Client(SIM_KEY, retry=one_try))
        assert await works(Client(SIM_KEY, base_url=sim.base_url, retry=one_try))
        monkeypatch.setenv("DASHSCOPE_BASE_URL", "")  # empty counts as unset
        assert await works(Client(SIM_KEY, retry=one_try))
        assert sim.ledger.count("task_get") == 3


class TestWorkspace:
    """``DASHSCOPE_WORKSPACE``, unless the argument says otherwise."""

    async def test_variable_and_argument(self, monkeypatch: pytest.MonkeyPatch) -> None:
        config = SimulatorConfig(api_keys={SIM_KEY}, workspace="ws-env")
        async with Simulator(config) as sim:
            monkeypatch.setenv("DASHSCOPE_WORKSPACE", "ws-env")
            assert await works(Client(SIM_KEY, base_url=sim.base_url))
            assert not await works(Client(SIM_KEY, base_url=sim.base_url, workspace="ws-arg"))
            assert not await works(Client(SIM_KEY, base_url=sim.base_url, workspace=""))
            codes = [r.status for r in sim.ledger.requests]
        assert codes == [200, 404, 403]


class TestTimeoutAndRetries:
    """``DASHSCOPE_TIMEOUT`` and ``DASHSCOPE_MAX_RETRIES`` fill in for absent arguments."""

    async def test_timeout_is_the_request_total(self, monkeypatch: pytest.MonkeyPatch) -> None:
        async with Simulator(SimulatorConfig(api_keys={SIM_KEY})) as sim:
            sim.set_faults(FaultConfig(latency=1.0))
            monkeypatch.setenv("DASHSCOPE_TIMEOUT", "0.2")
            monkeypatch.setenv("DASHSCOPE_MAX_RETRIES", "0")
            client = Client(SIM_KEY, base_url=sim.base_url)
            assert client.timeouts.total == 0.2
            async with client:
                with pytest.raises(emo_async.RequestTimeoutError):
                    await client.get_task("t-1")
            # An explicit Timeouts wins over the variable.
            explicit = Client(SIM_KEY, base_url=sim.base_url, timeouts=Timeouts(total=5.0))
            assert await works(explicit)

    @pytest.mark.parametrize(("value", "sent"), [("0", 1), ("2", 3)])
    async def test_max_retries_is_attempts_minus_one(
        self, monkeypatch: pytest.MonkeyPatch, value: str, sent: int
    ) -> None:
        async with Simulator(SimulatorConfig(api_keys={SIM_KEY})) as sim:
            sim.set_faults(FaultConfig(throttle_rate={"task_get": 1.0}, retry_after=0.0))
            monkeypatch.setenv("DASHSCOPE_MAX_RETRIES", value)
            client = Client(SIM_KEY, base_url=sim.base_url)
            async with client:
                with pytest.raises(emo_async.RateLimitError):
                    await client.get_task("t-1")
            assert sim.ledger.count("task_get") == sent
            # The rest of the policy is the default one; an explicit policy wins.
            assert client.retry == attrs.evolve(DEFAULT_RETRY_POLICY, attempts=sent)
            explicit = Client(SIM_KEY, base_url=sim.base_url, retry=RetryPolicy(attempts=1))
            assert not await works(explicit)
            assert sim.ledger.count("task_get") == sent + 1

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("DASHSCOPE_TIMEOUT", "soon"),
            ("DASHSCOPE_TIMEOUT", "-1"),
            ("DASHSCOPE_TIMEOUT", "inf"),
            ("DASHSCOPE_MAX_RETRIES", "-1"),
            ("DASHSCOPE_MAX_RETRIES", "2.5"),
            ("DASHSCOPE_LOG", "chatty"),
        ],
    )
    def test_unusable_values_are_named(
        self, monkeypatch: pytest.MonkeyPatch, name: str, value: str
    ) -> None:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            Client(SIM_KEY, base_url=DEAD_URL)


class TestLogLevel:
    """``DASHSCOPE_LOG`` sets the package logger's level, unless the application did."""

    async def test_sets_the_level_without_adding_handlers(
        self, sim: Simulator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        log = logging.getLogger("emo_async")
        handlers = list(log.handlers)
        # The root stays at WARNING and the capturing handler takes everything: a DEBUG record
        # gets through only by the package logger's own level.
        root = logging.getLogger()
        root_level = root.level
        root.setLevel(logging.WARNING)
        caplog.handler.setLevel(logging.NOTSET)
        monkeypatch.setenv("DASHSCOPE_LOG", "debug")
        try:
            async with Client(SIM_KEY, base_url=sim.base_url) as client:
                await client.get_task("t-1")
        finally:
            root.setLevel(root_level)
        assert log.level == logging.DEBUG
        assert log.handlers == handlers
        assert any(
            r.name == "emo_async" and r.levelno == logging.DEBUG and "/tasks/t-1" in r.getMessage()
            for r in caplog.records
        )

    def test_legacy_name_is_a_fallback(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DASHSCOPE_LOGGING_LEVEL", "error")
        Client(SIM_KEY, base_url=DEAD_URL)
        assert logging.getLogger("emo_async").level == logging.ERROR
        logging.getLogger("emo_async").setLevel(logging.NOTSET)
        monkeypatch.setenv("DASHSCOPE_LOG", "info")
        Client(SIM_KEY, base_url=DEAD_URL)
        assert logging.getLogger("emo_async").level == logging.INFO

    def test_the_applications_level_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        logging.getLogger("emo_async").setLevel(logging.WARNING)
        monkeypatch.setenv("DASHSCOPE_LOG", "debug")
        Client(SIM_KEY, base_url=DEAD_URL)
        assert logging.getLogger("emo_async").level == logging.WARNING
