"""A private PostgreSQL cluster, and databases of their own on the shared server."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sagaline.testing import (
    HarnessError,
    children_of,
    file_tail,
    free_port,
    kill_pid,
    pid_alive,
    wait_until,
)
from tests.private_server import PrivateServer

SHARED_PG_HOST = os.environ.get("SAGALINE_TEST_PG_HOST", "127.0.0.1")
SHARED_PG_PORT = int(os.environ.get("SAGALINE_TEST_PG_PORT", "5432"))
SHARED_PG_USER = os.environ.get("SAGALINE_TEST_PG_USER", "postgres")


def find_pg_bin() -> Path:
    """Directory holding ``initdb`` and ``pg_ctl`` (PATH or /usr/lib/postgresql/*/bin)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent

    def version_key(p: str) -> tuple[int, ...]:
        ver = Path(p).parent.name
        return tuple(int(x) for x in ver.split(".") if x.isdigit())

    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version_key, reverse=True)
    for c in cands:
        d = Path(c).parent
        if os.access(d / "pg_ctl", os.X_OK):
            return d
    raise HarnessError("initdb/pg_ctl not found (run scripts/ensure-services.sh)")


def _pg_user_cmd(cmd: Sequence[str]) -> list[str]:
    """Prefix ``cmd`` so that it runs as the ``postgres`` system user when we are root."""
    if os.geteuid() != 0:
        return list(cmd)
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    import shlex

    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]


class PrivatePostgres(PrivateServer):
    """A private PostgreSQL cluster (``initdb`` in a temp dir, trust auth, ``fsync=off``).

    When running as root, ``initdb``/``pg_ctl`` run as the ``postgres`` system user
    and the temp dir is chowned to it. :attr:`url` is a SQLAlchemy URL for psycopg 3.
    """

    def __init__(
        self,
        *,
        dbname: str = "sagaline",
        port: int | None = None,
        start: bool = True,
        timeout: int = 30,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.dbname = dbname
        # Server settings over the defaults below (e.g. synchronous_commit=on).
        self.settings = dict(settings or {})
        self.port = port or free_port()
        self.timeout = timeout
        self.bin = find_pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="sagaline-pg-"))
        self.datadir = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D", str(self.datadir),
                "-U", "postgres",
                "--auth=trust",
                "--no-sync",
                "-E", "UTF8",
                "--locale=C",
            ],
            what="initdb",
        )  # fmt: skip
        if start:
            self.start()
            self.create_database(self.dbname)

    # -- helpers ------------------------------------------------------------ #

    def _run(self, cmd: Sequence[str], what: str, timeout: float | None = None) -> str:
        try:
            res = subprocess.run(
                _pg_user_cmd(cmd),
                capture_output=True,
                text=True,
                timeout=timeout or self.timeout + 30,
                cwd=self.dir,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise HarnessError(f"{what} timed out:\n{file_tail(self.log_path)}") from e
        if res.returncode != 0:
            raise HarnessError(
                f"{what} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n"
                f"{file_tail(self.log_path)}"
            )
        return res.stdout

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL for another database on this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        """``postgresql+psycopg://postgres@127.0.0.1:PORT/DBNAME``."""
        return self.url_for(self.dbname)

    @property
    def dsn(self) -> str:
        """libpq DSN (for psycopg directly)."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={self.dbname}"

    @property
    def pid(self) -> int | None:
        """Postmaster pid from ``postmaster.pid``, or None if not running."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first.strip())
        except (OSError, IndexError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def is_running(self) -> bool:
        """True while the postmaster is alive."""
        return self.pid is not None

    def _accepts_connections(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                connect_timeout=2,
            ) as conn:  # fmt: skip
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    # -- lifecycle ---------------------------------------------------------- #

    def start(self) -> None:
        """``pg_ctl start`` on :attr:`port` and wait until it accepts TCP connections."""
        if self.is_running():
            return
        # After kill() the old postmaster may linger as an unreaped zombie (our pid 1
        # may not reap orphans) whose pid still "exists" for kill(pid, 0): drop the
        # stale lock files so that the restart performs crash recovery instead.
        for lock in (self.datadir / "postmaster.pid", self.dir / f".s.PGSQL.{self.port}.lock"):
            with contextlib.suppress(OSError):
                lock.unlink()
        opts = (
            f"-p {self.port} -k {self.dir} -c fsync=off -c listen_addresses=127.0.0.1 "
            "-c synchronous_commit=off -c full_page_writes=off"
        ) + "".join(f" -c {k}={v}" for k, v in self.settings.items())
        self._run(
            [
                str(self.bin / "pg_ctl"),
                "-D", str(self.datadir),
                "-l", str(self.log_path),
                "-o", opts,
                "-w", "-t", str(self.timeout),
                "start",
            ],
            what="pg_ctl start",
        )  # fmt: skip
        wait_until(
            self._accepts_connections, timeout=self.timeout, interval=0.1, what="postgres ready"
        )

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>`` (smart|fast|immediate); SIGKILL if that fails."""
        if not self.is_running():
            return
        try:
            self._run(
                [
                    str(self.bin / "pg_ctl"),
                    "-D", str(self.datadir),
                    "-m", mode,
                    "-w", "-t", str(self.timeout),
                    "stop",
                ],
                what="pg_ctl stop",
            )  # fmt: skip
        except HarnessError:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster (from ``postmaster.pid``) and its backends: a crash."""
        pid = self.pid
        if pid is None:
            return
        children = children_of(pid)
        kill_pid(pid, signal.SIGKILL)
        for c in children:
            kill_pid(c, signal.SIGKILL)
        wait_until(
            lambda: not pid_alive(pid) and not any(pid_alive(c) for c in children),
            timeout=15,
            interval=0.05,
            what="postgres processes to die",
        )

    def restart(self) -> None:
        """Stop (fast, if running) and start again on the same port."""
        self.stop("fast")
        self.start()

    def destroy(self) -> None:
        """Stop the cluster (immediate, then SIGKILL) and delete its directory."""
        with contextlib.suppress(HarnessError):
            self.stop("immediate")
        with contextlib.suppress(HarnessError):
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self, dbname: str) -> str:
        """Create ``dbname`` (if missing) on this cluster and return its URL."""
        _create_database("127.0.0.1", self.port, "postgres", dbname)
        return self.url_for(dbname)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _create_database(host: str, port: int, user: str, dbname: str) -> None:
    import psycopg

    with psycopg.connect(
        host=host, port=port, user=user, dbname="postgres", autocommit=True, connect_timeout=10
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(f"CREATE DATABASE {_quote_ident(dbname)}".encode())


def shared_postgres_url(dbname: str) -> str:
    """Create ``dbname`` (if missing) on the shared server 127.0.0.1:5432; return its URL."""
    _create_database(SHARED_PG_HOST, SHARED_PG_PORT, SHARED_PG_USER, dbname)
    return f"postgresql+psycopg://{SHARED_PG_USER}@{SHARED_PG_HOST}:{SHARED_PG_PORT}/{dbname}"


def drop_database(url: str) -> None:
    """``DROP DATABASE IF EXISTS ... WITH (FORCE)`` for the database named in ``url``."""
    from urllib.parse import unquote, urlsplit

    import psycopg

    parts = urlsplit(url)
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise ValueError(f"no database name in {url!r}")
    with psycopg.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=unquote(parts.username) if parts.username else "postgres",
        password=unquote(parts.password) if parts.password else None,
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(dbname)} WITH (FORCE)".encode())
