"""What the private servers of the test suite share: a log they close, and `with` that
destroys them (processes stopped by pid, directories deleted)."""

from __future__ import annotations

from types import TracebackType
from typing import IO, TypeVar

S = TypeVar("S", bound="PrivateServer")


class PrivateServer:
    _log: IO[bytes] | None = None

    def destroy(self) -> None:
        raise NotImplementedError

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self: S) -> S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()
