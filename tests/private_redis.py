"""A private redis-server for a test session, on a free port, stopped by pid."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO

from sagaline.testing import (
    HarnessError,
    file_tail,
    free_port,
    wait_until,
)
from tests.private_server import PrivateServer


def find_redis_server() -> str:
    """Absolute path of ``redis-server`` (PATH, then common locations)."""
    found = shutil.which("redis-server")
    if found:
        return found
    for cand in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server"):
        if os.access(cand, os.X_OK):
            return cand
    raise HarnessError("redis-server not found (run scripts/ensure-services.sh)")


class PrivateRedis(PrivateServer):
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
        self._stop_process(self._proc, timeout)

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash)."""
        self._kill_process(self._proc)

    def restart(self) -> None:
        """Stop (gracefully, if still running) and start again on the same port."""
        self.stop()
        self._proc = None
        self.start()

    def destroy(self) -> None:
        """Kill the server and delete its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
