"""A private RabbitMQ node, and vhosts of their own on the shared server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from sagaline.testing import (
    HarnessError,
    file_tail,
    free_port,
    kill_pid,
    pids_in_group,
    wait_until,
)
from tests.private_server import PrivateServer

# The shared RabbitMQ: tests never use its default vhost, each session makes its own.
SHARED_AMQP_URL = os.environ.get("SAGALINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")

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

    conn = amqp.Connection(
        f"{host}:{port}", userid="guest", password="guest", virtual_host=vhost, connect_timeout=2
    )
    try:
        conn.connect()
        return True
    except Exception:  # refused, reset mid-handshake while the node boots, auth not ready
        return False
    finally:
        with contextlib.suppress(Exception):
            conn.collect()


class PrivateRabbitMQ(PrivateServer):
    """A throw-away RabbitMQ node: own node name, AMQP port, distribution port, epmd,
    config, data and log directories, Erlang cookie (``HOME``) in a temp directory.

    It never reads the system node's ``/etc/rabbitmq`` files. Its own ``epmd``
    (foreground, on a private port) and the node run in one new process group,
    stopped by pid. Data survive :meth:`stop` + :meth:`start` (durable queues and
    persistent messages are kept; quorum queues recover their Raft log).
    """

    def __init__(
        self, *, port: int | None = None, start: bool = True, ready_timeout: float = 90.0
    ) -> None:
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
            "log.console = true\nlog.console.level = info\nlog.file = false\n"
        )
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
            res = subprocess.run(
                [str(self.bin / "rabbitmqctl"), "-n", self.nodename, *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise HarnessError(f"rabbitmqctl {' '.join(args)} timed out") from e
        if res.returncode != 0:
            raise HarnessError(
                f"rabbitmqctl {' '.join(args)} failed ({res.returncode}):\n"
                f"{res.stdout}\n{res.stderr}"
            )
        return res.stdout

    def queue_types(self, vhost: str = "/") -> dict[str, str]:
        """``{queue name: type}`` in ``vhost`` (default: the default vhost)."""
        out = self.ctl("list_queues", "-p", vhost, "name", "type", "--no-table-headers", "-q")
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)

    def add_vhost(self, name: str) -> str:
        """A new vhost ``name`` open to guest; returns its AMQP URL. Tests sharing one
        node each take a vhost of their own: they see none of the others' queues."""
        from urllib.parse import quote

        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{quote(name, safe='')}"

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        epmd = shutil.which("epmd") or str(self.bin / "epmd")
        self._epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=self.env,
        )

    def start(self) -> None:
        """Start the node and wait (bounded) until it accepts AMQP connections."""
        if self.is_running():
            return
        self._start_epmd()
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while running
        self._proc = subprocess.Popen(
            [str(self.bin / "rabbitmq-server")],
            env=self.env,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise HarnessError(
                    f"rabbitmq-server exited with {self._proc.returncode}:\n"
                    f"{file_tail(self.log_path)}"
                )
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
            wait_until(
                lambda: not pids_in_group(proc.pid),
                timeout=max(1.0, timeout),
                interval=0.1,
                what="rabbitmq processes to exit",
            )
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


def _rabbitmqctl(*args: str) -> str:
    """``rabbitmqctl`` against the shared node (as root: Debian's wrapper finds its cookie)."""
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    try:
        res = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HarnessError(f"rabbitmqctl {' '.join(args)}: {e}") from e
    if res.returncode != 0:
        raise HarnessError(
            f"rabbitmqctl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
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
