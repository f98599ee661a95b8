"""A private nats-server with JetStream (file storage, so streams survive a restart)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import IO

from sagaline.testing import HarnessError, file_tail, free_port, wait_until
from tests.private_server import PrivateServer


def find_nats_server() -> str | None:
    return shutil.which("nats-server") or next(
        (
            c
            for c in ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server")
            if Path(c).is_file()
        ),
        None,
    )


class PrivateNats(PrivateServer):
    def __init__(self, *, start: bool = True) -> None:
        binary = find_nats_server()
        if binary is None:
            raise HarnessError("nats-server not found")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sagaline-nats-"))
        self.log_path = self.dir / "nats.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def start(self) -> None:
        if self.is_running():
            return
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while running
        self._proc = subprocess.Popen(
            [
                self.binary,
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.dir / "js"),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise HarnessError(f"nats-server exited:\n{file_tail(self.log_path)}")
            return self._accepts()

        wait_until(ready, timeout=30, interval=0.05, what="nats-server")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_process(self._proc, timeout)

    def kill(self) -> None:
        self._kill_process(self._proc)

    def restart(self) -> None:
        self.stop()
        self._proc = None
        self.start()

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
