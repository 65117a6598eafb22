"""A throwaway PostgreSQL server in a temporary folder, for tests, benchmarks and demos.

``initdb`` refuses to run as root, so when this process is root the server's programs run as
the ``postgres`` user (``runuser -u postgres --``) and the folder is handed to that user. The
server listens on 127.0.0.1 on a free port with ``trust`` authentication, and durability is
traded for speed (``fsync=off``): it holds nothing worth keeping.

    server = TempPostgres.start()
    dsn = server.create_database("t1")
    ...
    server.restart()   # a server restart mid-run
    server.stop()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresNotInstalled", "TempPgBouncer", "TempPostgres", "find_pg_bin"]


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server programs (``initdb``, ``pg_ctl``) on this machine."""


def find_pg_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (PATH first, then Debian's layout)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for c in candidates:
        if (c / "pg_ctl").exists() and (c / "initdb").exists():
            return c
    raise PostgresNotInstalled("PostgreSQL server programs (initdb, pg_ctl) are not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TempPostgres:
    """One PostgreSQL server in a temporary folder (see the module's docstring)."""

    def __init__(self, root: Path, port: int, bindir: Path, as_user: str | None) -> None:
        self.root = root
        self.port = port
        self.bindir = bindir
        self.as_user = as_user
        self.data = root / "data"
        self.log = root / "server.log"

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def start(cls, root: Path | None = None) -> TempPostgres:
        bindir = find_pg_bin()
        as_user = "postgres" if os.geteuid() == 0 else None
        made = Path(tempfile.mkdtemp(prefix="emo-pg-")) if root is None else root
        made.mkdir(parents=True, exist_ok=True)
        if as_user is not None:
            shutil.chown(made, user=as_user)
            made.chmod(0o700)
        server = cls(made, _free_port(), bindir, as_user)
        server._run(
            "initdb",
            "-D",
            str(server.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        conf = server.data / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as f:
            f.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"port = {server.port}\n"
                f"unix_socket_directories = '{made}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\n"
            )
        server.start_server()
        return server

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        cmd = [str(self.bindir / program), *args]
        if self.as_user is not None:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{program} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def start_server(self) -> None:
        """Start (or start again) the server and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL did not start: {self.log.read_text()[-2000:]}")

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, *, down_for: float = 0.0) -> None:
        """Stop the server (dropping every connection), stay down ``down_for`` s, start again."""
        self.stop_server("fast")
        if down_for > 0:
            time.sleep(down_for)
        self.start_server()

    def stop(self) -> None:
        """Stop the server and delete its folder."""
        self.stop_server("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its DSN."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.dsn(name)

    def __enter__(self) -> TempPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TempPgBouncer:
    """PgBouncer in **transaction** pooling mode in front of a :class:`TempPostgres`: each
    transaction may run on any server connection, so nothing may rely on session state.

    Needs the ``pgbouncer`` program (Debian: ``apt-get install pgbouncer``); it runs as the
    ``postgres`` user when this process is root (PgBouncer refuses to run as root).
    """

    def __init__(self, server: TempPostgres) -> None:
        program = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
        )
        if program is None:
            raise PostgresNotInstalled("pgbouncer is not installed")
        self.server = server
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="emo-pgb-"))
        as_user = server.as_user
        (self.root / "users.txt").write_text('"postgres" ""\n')
        ini = self.root / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={server.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.root}\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            "pool_mode = transaction\n"
            "max_client_conn = 500\n"
            "default_pool_size = 20\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.root / 'pgbouncer.log'}\n"
        )
        if as_user is not None:
            shutil.chown(self.root, user=as_user)
            for f in self.root.iterdir():
                shutil.chown(f, user=as_user)
        cmd = [program, str(ini)]
        if as_user is not None:
            cmd = ["runuser", "-u", as_user, "--", *cmd]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"pgbouncer exited: {err[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("pgbouncer did not start")

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        shutil.rmtree(self.root, ignore_errors=True)
