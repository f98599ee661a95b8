"""What the private servers of the test suite share: a log they close, and `with` that
destroys them (processes stopped by pid, directories deleted)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from types import TracebackType
from typing import IO, TypeVar

from sagaline.testing import kill_pid

S = TypeVar("S", bound="PrivateServer")


class PrivateServer:
    _log: IO[bytes] | None = None

    def destroy(self) -> None:
        raise NotImplementedError

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _stop_process(self, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; closes the log."""
        if proc is not None and proc.poll() is None:
            kill_pid(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_pid(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._close_log()

    def _kill_process(self, proc: subprocess.Popen[bytes] | None) -> None:
        """SIGKILL (a crash); closes the log."""
        if proc is not None and proc.poll() is None:
            kill_pid(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self._close_log()

    def __enter__(self: S) -> S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()
