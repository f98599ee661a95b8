"""Worker processes for tests, benchmarks and the demo: start, wait ready, stop by pid.

Every wait is bounded in both iterations and wall time; a worker runs in its own
session (process group), is stopped by SIGTERM to its main process then SIGKILL
of its group, and is found again by its pid, never by name.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from .config import READY_FILE_ENV

__all__ = [
    "HarnessError",
    "WorkerExited",
    "WorkerProcess",
    "children_of",
    "file_tail",
    "free_port",
    "kill_pid",
    "pid_alive",
    "pids_in_group",
    "wait_until",
]


class HarnessError(RuntimeError):
    """A harness-managed process failed to start, stop or become ready."""


class WorkerExited(HarnessError):
    """The worker exited before it was ready."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is currently free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until true; raise :class:`HarnessError` after ``timeout`` s.

    The loop is bounded both by wall time and by a maximum iteration count.
    """
    deadline = time.monotonic() + timeout
    max_iter = int(timeout / max(interval, 0.001)) + 2
    for _ in range(max_iter):
        if predicate():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if predicate():
        return
    raise HarnessError(f"timed out after {timeout:.1f}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # format: "pid (comm) S ..." -- comm may contain spaces/parens.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (via /proc/<pid>/task/*/children, fallback ps)."""
    out: set[int] = set()
    paths = glob.glob(f"/proc/{pid}/task/*/children")
    if paths:
        for p in paths:
            try:
                out.update(int(x) for x in Path(p).read_text().split())
            except OSError:
                continue
        return sorted(c for c in out if pid_alive(c))
    try:
        res = subprocess.run(
            ["ps", "--ppid", str(pid), "-o", "pid="],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted(int(x) for x in res.stdout.split() if pid_alive(int(x)))


def pids_in_group(pgid: int) -> list[int]:
    """All live (non-zombie) pids whose process group is ``pgid``."""
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        # fields[0]=state, [1]=ppid, [2]=pgrp
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def file_tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "<no log>"
    return data[-max_bytes:].decode("utf-8", errors="replace")


class WorkerProcess:
    """A real ``celery worker`` in its own session / process group.

    :meth:`start` waits for ``$SAGALINE_READY_FILE``, which a worker of an app that
    called ``sagaline.init_app`` touches once ready (an app without sagaline touches
    it from Celery's ``worker_ready`` signal itself). The worker runs in ``cwd``
    (default: this process's), where its app module must be importable. Its log, its
    ready file and its pid file (for whoever cleans up after a killed launcher) are
    in ``workdir``, a temporary directory of its own unless given.
    """

    def __init__(
        self,
        app_module: str,
        *,
        env: Mapping[str, str] | None = None,
        pool: str = "prefork",
        concurrency: int = 1,
        queues: Sequence[str] | None = None,
        name: str | None = None,
        loglevel: str = "INFO",
        extra_args: Sequence[str] = (),
        ready_timeout: float = 60.0,
        cwd: Path | str | None = None,
        workdir: Path | str | None = None,
    ) -> None:
        self.app_module = app_module
        self.pool = pool
        self.concurrency = concurrency
        self.queues = list(queues) if queues else []
        self.name = name or f"w{uuid.uuid4().hex[:8]}"
        self.loglevel = loglevel
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.cwd = Path.cwd() if cwd is None else Path(cwd)
        # Holds the log and the ready file. Our own temp dir unless ``workdir`` is given
        # (e.g. a pytest tmp dir, so pytest manages retention of the logs).
        self._owns_dir = workdir is None
        if workdir is None:
            self.dir = Path(tempfile.mkdtemp(prefix=f"sagaline-worker-{self.name}-"))
        else:
            self.dir = Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "worker.log"
        self.ready_file = self.dir / "worker.ready"
        self.pid_file = self.dir / "worker.pid"
        self.env: dict[str, str] = dict(os.environ)
        if env:
            self.env.update(env)
        self.env[READY_FILE_ENV] = str(self.ready_file)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        """Command line used to start the worker."""
        args = [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker",
            "-P", self.pool, "-c", str(self.concurrency), "--loglevel", self.loglevel,
            "-n", f"{self.name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        if self.queues:
            args += ["-Q", ",".join(self.queues)]
        return args + self.extra_args

    @property
    def pid(self) -> int:
        """Pid of the main worker process (also its process-group id)."""
        if self._proc is None:
            raise HarnessError("worker not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the main process has exited (negative = signal)."""
        return self._proc.poll() if self._proc is not None else None

    def is_running(self) -> bool:
        """True while the main worker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> WorkerProcess:
        """Spawn the worker and wait until it is ready (or raise with the log tail)."""
        if self._proc is not None:
            raise HarnessError("worker already started")
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while running
        self._proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Its own session hides it from a signal to the launcher's group: whoever has to
        # clean up after a killed launcher finds the worker (and its group) here.
        self.pid_file.write_text(f"{self._proc.pid}\n")

        def ready() -> bool:
            if self.ready_file.exists():
                return True
            if self._proc is not None and self._proc.poll() is not None:
                raise WorkerExited(
                    f"worker {self.name} exited with {self._proc.returncode} before ready:\n"
                    f"{self.log_tail()}"
                )
            return False

        try:
            wait_until(ready, timeout=self.ready_timeout, interval=0.1, what="worker ready")
        except HarnessError as e:
            self.kill()
            raise type(e)(f"{e}\n--- worker log tail ---\n{self.log_tail()}") from e
        return self

    def child_pids(self) -> list[int]:
        """Live direct children of the main worker process (the pool processes)."""
        if not self.is_running():
            return []
        return children_of(self.pid)

    def group_pids(self) -> list[int]:
        """All live processes in the worker's process group."""
        if self._proc is None:
            return []
        return pids_in_group(self._proc.pid)

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            # group leader may be gone while children remain: signal them by pid
            for p in pids_in_group(self._proc.pid):
                kill_pid(p, sig)

    def _wait_group_gone(self, timeout: float) -> bool:
        if self._proc is None:
            return True
        proc = self._proc
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        try:
            wait_until(
                lambda: not pids_in_group(proc.pid),
                timeout=max(1.0, timeout),
                interval=0.05,
                what="worker process group to exit",
            )
        except HarnessError:
            return False
        return proc.poll() is not None

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children)."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGKILL)
        if not self._wait_group_gone(10):
            for p in pids_in_group(self._proc.pid):
                kill_pid(p, signal.SIGKILL)
            self._wait_group_gone(5)
        self._close_log()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the main process (warm shutdown), wait up to ``timeout`` s, then SIGKILL
        the group. Only the main process is signalled: pool children killed under it
        leave Celery's main process waiting for them until the timeout."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGTERM)
            if self._wait_group_gone(timeout):
                self._close_log()
                return
        self.kill()

    def log_text(self) -> str:
        """Full worker log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, max_bytes: int = 4000) -> str:
        """Last ``max_bytes`` of the worker log."""
        return file_tail(self.log_path, max_bytes)

    def cleanup(self) -> None:
        """Stop the worker and delete its temp dir (only if the harness created it)."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.cleanup()  # keep the log around when the block failed
        else:
            self.stop()
