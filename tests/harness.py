"""Process harness for integration and chaos tests.

Everything here starts *real* processes (redis-server, a private PostgreSQL
cluster, RabbitMQ, and Celery workers through `sagaline.testing`) and always
cleans them up by pid / process group, never by name. Every wait is bounded in
both iterations and wall time.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from sagaline import testing
from sagaline.testing import (
    HarnessError,
    children_of,
    file_tail,
    kill_pid,
    pid_alive,
    pids_in_group,
    wait_until,
)

# The name the harness's own tests know it by.
_pids_in_group = pids_in_group

REPO_ROOT = Path(__file__).resolve().parent.parent

SHARED_PG_HOST = os.environ.get("SAGALINE_TEST_PG_HOST", "127.0.0.1")
SHARED_PG_PORT = int(os.environ.get("SAGALINE_TEST_PG_PORT", "5432"))
SHARED_PG_USER = os.environ.get("SAGALINE_TEST_PG_USER", "postgres")
# The shared RabbitMQ: tests never use its default vhost, each session makes its own.
SHARED_AMQP_URL = os.environ.get("SAGALINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")

__all__ = [
    "REPO_ROOT",
    "HarnessError",
    "PrivatePostgres",
    "PrivateRabbitMQ",
    "PrivateRedis",
    "WorkerProcess",
    "drop_database",
    "find_pg_bin",
    "find_redis_server",
    "free_port",
    "pid_alive",
    "rabbitmq_queue_types",
    "rabbitmq_vhost",
    "shared_postgres_url",
    "wait_until",
]


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is currently free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_redis_server() -> str:
    """Absolute path of ``redis-server`` (PATH, then common locations)."""
    found = shutil.which("redis-server")
    if found:
        return found
    for cand in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server"):
        if os.access(cand, os.X_OK):
            return cand
    raise HarnessError("redis-server not found (run scripts/ensure-services.sh)")


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


# --------------------------------------------------------------------------- #
# Redis
# --------------------------------------------------------------------------- #


class PrivateRedis:
    """A throw-away ``redis-server`` on a free port with its own temp directory.

    ``appendonly=False`` (default) runs fully in-memory (``--save "" --appendonly no``);
    ``appendonly=True`` uses ``--appendonly yes --appendfsync always`` so that data
    survives :meth:`kill` + :meth:`restart`.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        port: int | None = None,
        start: bool = True,
        ready_timeout: float = 30.0,
    ) -> None:
        self.appendonly = appendonly
        self.port = port or free_port()
        self.ready_timeout = ready_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="sagaline-redis-"))
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Pid of the running server, or None."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _ping(self) -> bool:
        import redis

        try:
            client = redis.Redis(
                host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1
            )
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def start(self) -> None:
        """Start the server (on ``self.port``) and wait until it answers PING."""
        if self.is_running():
            return
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--save", "",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while running
        self._proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True
        )

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise HarnessError(
                    f"redis-server exited with {self._proc.returncode}:\n{file_tail(self.log_path)}"
                )
            return self._ping()

        try:
            wait_until(ready, timeout=self.ready_timeout, interval=0.05, what="redis-server")
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            kill_pid(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_pid(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            kill_pid(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self._close_log()

    def restart(self) -> None:
        """Stop (gracefully, if still running) and start again on the same port."""
        self.stop()
        self._proc = None
        self.start()

    def destroy(self) -> None:
        """Kill the server and delete its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


# --------------------------------------------------------------------------- #
# PostgreSQL
# --------------------------------------------------------------------------- #


def _pg_user_cmd(cmd: Sequence[str]) -> list[str]:
    """Prefix ``cmd`` so that it runs as the ``postgres`` system user when we are root."""
    if os.geteuid() != 0:
        return list(cmd)
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    import shlex

    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]


class PrivatePostgres:
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
    ) -> None:
        self.dbname = dbname
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
        )
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

    def __enter__(self) -> PrivatePostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


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


# --------------------------------------------------------------------------- #
# RabbitMQ
# --------------------------------------------------------------------------- #

RABBITMQ_SBIN_CANDIDATES = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin")


def find_rabbitmq_bin() -> Path:
    """Directory of the unwrapped ``rabbitmq-server``/``rabbitmqctl`` scripts.

    Debian's ``/usr/sbin`` wrappers switch to the ``rabbitmq`` user and read the
    system node's environment file; a private node needs the scripts themselves.
    """
    for cand in RABBITMQ_SBIN_CANDIDATES:
        if os.access(Path(cand) / "rabbitmq-server", os.X_OK):
            return Path(cand)
    found = shutil.which("rabbitmq-server")
    if found:
        return Path(found).resolve().parent
    raise HarnessError("rabbitmq-server not found (apt-get install rabbitmq-server)")


def _amqp_accepts(host: str, port: int, vhost: str = "/") -> bool:
    import amqp

    conn = amqp.Connection(f"{host}:{port}", userid="guest", password="guest",
                           virtual_host=vhost, connect_timeout=2)
    try:
        conn.connect()
        return True
    except Exception:  # refused, reset mid-handshake while the node boots, auth not ready
        return False
    finally:
        with contextlib.suppress(Exception):
            conn.collect()


class PrivateRabbitMQ:
    """A throw-away RabbitMQ node: own node name, AMQP port, distribution port, epmd,
    config, data and log directories, Erlang cookie (``HOME``) in a temp directory.

    It never reads the system node's ``/etc/rabbitmq`` files. Its own ``epmd``
    (foreground, on a private port) and the node run in one new process group,
    stopped by pid. Data survive :meth:`stop` + :meth:`start` (durable queues and
    persistent messages are kept; quorum queues recover their Raft log).
    """

    def __init__(self, *, port: int | None = None, start: bool = True,
                 ready_timeout: float = 90.0) -> None:
        self.port = port or free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.ready_timeout = ready_timeout
        self.bin = find_rabbitmq_bin()
        self.nodename = f"sagaline-{uuid.uuid4().hex[:8]}@localhost"
        self.dir = Path(tempfile.mkdtemp(prefix="sagaline-rabbitmq-"))
        self.log_path = self.dir / "console.log"
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            # A test machine may have little free disk: do not block publishers for it.
            "disk_free_limit.absolute = 1MB\n"
            "log.console = true\nlog.console.level = info\nlog.file = false\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self._epmd: subprocess.Popen[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:<port>//`` (the default vhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.dir),  # the Erlang cookie lives here, not in root's home
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
        })  # fmt: skip
        return env

    @property
    def pid(self) -> int | None:
        """Pid of the running node's wrapper script (its process-group leader), or None."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        """True while the node's process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def epmd_pid(self) -> int | None:
        """Pid of this node's own epmd, while it runs."""
        return self._epmd.pid if self._epmd is not None and self._epmd.poll() is None else None

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n <this node> *args`` (with this node's cookie and epmd)."""
        try:
            res = subprocess.run([str(self.bin / "rabbitmqctl"), "-n", self.nodename, *args],
                                 env=self.env, capture_output=True, text=True,
                                 timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise HarnessError(f"rabbitmqctl {' '.join(args)} timed out") from e
        if res.returncode != 0:
            raise HarnessError(f"rabbitmqctl {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stdout}\n{res.stderr}")
        return res.stdout

    def queue_types(self) -> dict[str, str]:
        """``{queue name: type}`` in the default vhost."""
        out = self.ctl("list_queues", "name", "type", "--no-table-headers", "-q")
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        epmd = shutil.which("epmd") or str(self.bin / "epmd")
        self._epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env=self.env)

    def start(self) -> None:
        """Start the node and wait (bounded) until it accepts AMQP connections."""
        if self.is_running():
            return
        self._start_epmd()
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while running
        self._proc = subprocess.Popen(
            [str(self.bin / "rabbitmq-server")], env=self.env, cwd=self.dir,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise HarnessError(
                    f"rabbitmq-server exited with {self._proc.returncode}:\n"
                    f"{file_tail(self.log_path)}")
            return _amqp_accepts("127.0.0.1", self.port)

        try:
            wait_until(ready, timeout=self.ready_timeout, interval=0.25, what="rabbitmq-server")
        except BaseException:
            self.kill()
            raise

    def _group_gone(self, timeout: float) -> bool:
        proc = self._proc
        if proc is None:
            return True
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        try:
            wait_until(lambda: not pids_in_group(proc.pid), timeout=max(1.0, timeout),
                       interval=0.1, what="rabbitmq processes to exit")
        except HarnessError:
            return False
        return True

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful stop (SIGTERM: the wrapper runs the node's own shutdown), then SIGKILL
        of the node's process group after ``timeout`` s. epmd keeps running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            kill_pid(proc.pid, signal.SIGTERM)
        if not self._group_gone(timeout):
            self.kill()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the node's whole process group (a crash)."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in pids_in_group(proc.pid):
            kill_pid(p, signal.SIGKILL)
        self._group_gone(10)
        self._close_log()

    def restart(self) -> None:
        """Stop gracefully and start again: same node name, port and data."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Kill the node and its epmd, and delete the directory."""
        self.kill()
        if self._epmd is not None:
            kill_pid(self._epmd.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._epmd.wait(timeout=10)
            self._epmd = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrivateRabbitMQ:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


def _rabbitmqctl(*args: str) -> str:
    """``rabbitmqctl`` against the shared node (as root: Debian's wrapper finds its cookie)."""
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    try:
        res = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HarnessError(f"rabbitmqctl {' '.join(args)}: {e}") from e
    if res.returncode != 0:
        raise HarnessError(f"rabbitmqctl {' '.join(args)} failed ({res.returncode}):\n"
                           f"{res.stdout}\n{res.stderr}")
    return res.stdout


def rabbitmq_queue_types(amqp_url: str) -> dict[str, str]:
    """``{queue name: type}`` ("classic", "quorum", ...) in the vhost of ``amqp_url``."""
    from urllib.parse import unquote, urlsplit

    vhost = unquote(urlsplit(amqp_url).path[1:]) or "/"
    out = _rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--no-table-headers", "-q")
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


@contextlib.contextmanager
def rabbitmq_vhost(prefix: str = "sagaline-test") -> Iterator[str]:
    """A fresh vhost on the shared RabbitMQ for guest; yields its AMQP URL; deleted after.

    Queues of one vhost are invisible to the others: workers of two test sessions
    (or of two stacks with different queue types) never consume each other's messages.
    """
    from urllib.parse import quote

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{SHARED_AMQP_URL.rstrip('/')}/{quote(name, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", name)


# --------------------------------------------------------------------------- #
# Celery worker
# --------------------------------------------------------------------------- #


class WorkerProcess(testing.WorkerProcess):
    """sagaline's launcher (`sagaline.testing`), run from the repository's root by
    default so that the ``tests.*``, ``bench`` and ``examples`` app modules import."""

    def __init__(self, app_module: str, *, cwd: Path | str = REPO_ROOT,
                 **options: Any) -> None:
        super().__init__(app_module, cwd=cwd, **options)
