"""The embedded broker: kombu's filesystem transport, with messages that appear whole.

kombu's own writer creates `<time>_<uuid>.<queue>.msg`, then locks and fills it;
its reader never locks, so a reader polling at the wrong moment reads half a
message (large ones, often) and the worker dies on the JSON error. Here a message
is written to a hidden temporary name and renamed into place (a rename within one
directory is atomic on POSIX), and a reader claims a message by renaming it to a
name of its own before reading it, so that two readers never read one file. A file
that still does not decode (written by something else) is set aside and logged,
never fatal.

Registered as the `sagaline-fs://` transport (see `register`); `init_app` gives it
to apps without a broker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils import json as kombu_json

# kombu's own (untyped) JSON functions, as its filesystem transport uses them.
dumps: Callable[[Any], str] = kombu_json.dumps
loads: Callable[[str | bytes], Any] = kombu_json.loads

log = logging.getLogger("sagaline")

SCHEME = "sagaline-fs"


def register() -> None:
    """Make `sagaline-fs://` a kombu transport (idempotent)."""
    TRANSPORT_ALIASES.setdefault(SCHEME, "sagaline.broker:Transport")


class Channel(filesystem.Channel):
    # kombu's own base classes disagree on this signature; it is the filesystem one.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # A leading dot: readers only take `<x>.<queue>.msg` names, never this one.
        partial = os.path.join(self.data_folder_out, f".{name}.{os.getpid()}.part")
        try:
            with open(partial, "wb") as f:
                f.write(dumps(payload).encode())
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        wanted = f"{queue}.msg"
        folder = self.data_folder_in
        for filename in sorted(os.listdir(folder)):
            if filename.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(folder, f".{filename}.{uuid.uuid4().hex}.claimed")
            try:
                # Exactly one reader's rename succeeds; the others find the file gone.
                os.rename(os.path.join(folder, filename), claimed)
            except OSError:
                continue
            try:
                with open(claimed, "rb") as f:
                    raw = f.read()
            except OSError as exc:
                raise ChannelError(f"Cannot read file {claimed!r} from queue.") from exc
            try:
                payload = loads(raw.decode())
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                aside = os.path.join(folder, f".{filename}.undecodable")
                with contextlib.suppress(OSError):
                    os.replace(claimed, aside)
                log.error(
                    "embedded broker: message file %s is not valid JSON (%s); set aside as %s",
                    filename,
                    exc,
                    aside,
                )
                continue
            self._done_with(claimed, filename)
            return payload
        raise Empty()

    def _done_with(self, claimed: str, filename: str) -> None:
        with contextlib.suppress(OSError):
            if self.store_processed:
                os.replace(claimed, os.path.join(self.processed_folder, filename))
            else:
                os.remove(claimed)


class Transport(filesystem.Transport):
    """kombu's filesystem transport with atomic writes and claimed reads."""

    Channel = Channel
    driver_type = "filesystem"
    driver_name = "sagaline-fs"
