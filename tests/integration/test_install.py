"""sagaline as a user installs it: the wheel, with one documented set of extras, in a
fresh virtualenv outside the checkout, serving a saga through a real worker.

The wheel is built once per session. Its dependencies come from a wheel cache
outside the repository, keyed by the dependency list, so that only the first run
on a machine (or after a dependency change) reaches the package index; every venv
is then installed with `--no-index` (the cache: $SAGALINE_TEST_WHEEL_CACHE, else
sagaline-test-wheels in the temp directory). pip runs `--isolated` for those
installs: no configuration of this machine can add a package the wheel does not declare.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    REPO_ROOT,
    PrivateRedis,
    WorkerProcess,
    drop_database,
    shared_postgres_url,
    wait_until,
)
from tests.integration.test_demo import assert_demo_output, kill_left_worker
from tests.integration.test_tracing import serve_otlp
from tests.stores import create_mariadb_database, drop_mariadb_database
from tests.unit.test_compose import IMAGE_SOURCES

pytestmark = pytest.mark.timeout(420)

RABBITMQ_URL = os.environ.get("SAGALINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
PIP_TIMEOUT = 300.0  # the first run on a machine downloads every dependency
SAGA_TIMEOUT = 60.0

# The smallest app a user writes: broker from CELERY_BROKER_URL (none: sagaline's
# server-less default), store from SAGALINE_STORE_URL (none: SQLite in SAGALINE_HOME).
APP_MODULE = '''
"""Two steps and a compensation, as in the README's quickstart."""
import os
from pathlib import Path

from celery import Celery
from celery.signals import worker_ready

import sagaline
from sagaline import Saga, saga_step

app = Celery("installcheck")
# A queue of this test run's own: the RabbitMQ server is shared with other tests.
app.conf.task_default_queue = os.environ["INSTALLCHECK_QUEUE"]
sagaline.init_app(app)


@worker_ready.connect
def _ready(**_):
    Path(os.environ["SAGALINE_READY_FILE"]).touch()


@app.task(name="installcheck.release")
def release(compensation_data):
    pass


@saga_step(compensate=release)
@app.task(name="installcheck.reserve")
def reserve(order_id):
    return {"reservation": f"res-{order_id}", "worker_pid": os.getpid()}


@app.task(name="installcheck.confirm")
def confirm(order_id, reservation):
    return {"confirmation": f"{order_id}/{reservation}"}


checkout = Saga("installcheck").add_step(reserve).add_step(confirm, no_compensation=True)
'''

CLIENT_SCRIPT = """
import json, os, sys

import sagaline
from installcheck import checkout

handle = checkout.run(order_id="o-1")
result = handle.get(timeout=float(sys.argv[1]))
print(json.dumps({"sagaline": sagaline.__file__, "client_pid": os.getpid(), "result": result,
                  "status": sagaline.get_saga(handle.saga_id).status.value}))
"""


def pip(*args: str, isolated: bool = True) -> None:
    """This interpreter's pip; `--isolated`: no pip configuration of this machine applies."""
    argv = [
        sys.executable,
        "-m",
        "pip",
        *(["--isolated"] if isolated else []),
        "--disable-pip-version-check",
        *args,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


def pyproject() -> dict[str, Any] | None:
    """pyproject.toml, parsed (None on Python 3.10, which has no tomllib)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        return None
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def extras_of(name: str, extras: dict[str, list[str]]) -> set[str]:
    """`name` and the extras it names through `sagaline[...]`: what the cache is filled with
    (so a change to the test extra, say, does not refill it)."""
    found = {name}
    for requirement in extras.get(name, []):
        if requirement.startswith("sagaline["):
            for inner in requirement[len("sagaline[") :].split("]", 1)[0].split(","):
                if inner.strip() not in found:
                    found |= extras_of(inner.strip(), extras)
    return found


def dependency_key() -> str:
    """A hash of what decides the cache's content: the dependency lists and the platform."""
    doc = pyproject()
    if doc is None:  # the whole file, so that a change is never missed
        decided: Any = (REPO_ROOT / "pyproject.toml").read_text()
    else:
        extras = doc["project"].get("optional-dependencies", {})
        cached = (
            extras_of("all", extras)
            | extras_of("bench-peers", extras)
            | extras_of("testing", extras)
        )
        decided = [
            doc["build-system"]["requires"],
            doc["project"]["dependencies"],
            {name: extras[name] for name in sorted(cached) if name in extras},
        ]
    decided = [decided, sys.version_info[:2], sys.platform, platform.machine()]
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:16]


def wheel_cache() -> Path:
    """Wheels of every dependency of `sagaline[all,bench-peers,testing]` and of the build
    backend, filled once."""
    base = Path(
        os.environ.get("SAGALINE_TEST_WHEEL_CACHE")
        or Path(tempfile.gettempdir()) / "sagaline-test-wheels"
    )
    cache = base / dependency_key()
    if cache.is_dir():
        return cache
    base.mkdir(parents=True, exist_ok=True)
    filling = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=base))
    try:
        # Not isolated: this is the one step that may use the machine's package index.
        doc = pyproject()
        backend = doc["build-system"]["requires"] if doc else ["hatchling"]
        pip(
            "wheel",
            "--quiet",
            "--wheel-dir",
            str(filling),
            f"{REPO_ROOT}[all,bench-peers,testing]",
            *backend,
            isolated=False,
        )
        # The cache holds dependencies only: sagaline itself is built fresh every session.
        for stale in filling.glob("sagaline-*.whl"):
            stale.unlink()
        # Atomic: a concurrent session either sees the whole cache or fills its own.
        os.rename(filling, cache)
    except OSError:
        if not cache.is_dir():
            raise
    finally:
        shutil.rmtree(filling, ignore_errors=True)
    return cache


@dataclass
class Wheelhouse:
    wheel: Path
    cache: Path
    root: Path
    venvs: dict[str, Path]

    def venv(self, extras: str = "") -> Path:
        """A venv (no pip of its own) holding the wheel with `extras` and nothing else;
        one per set of extras in a session, since nothing in a test changes it."""
        if extras not in self.venvs:
            where = self.root / f"venv-{extras.replace(',', '-') or 'bare'}"
            subprocess.run(
                [sys.executable, "-m", "venv", "--without-pip", str(where)],
                check=True,
                timeout=60,
                capture_output=True,
            )
            python = where / "bin" / "python"
            requirement = (
                f"sagaline[{extras}] @ {self.wheel.as_uri()}" if extras else str(self.wheel)
            )
            # --no-compile: Python compiles what the test imports, not all of every package.
            pip(
                "--python",
                str(python),
                "install",
                "--quiet",
                "--no-compile",
                "--no-index",
                "--find-links",
                str(self.cache),
                requirement,
            )
            self.venvs[extras] = where
        return self.venvs[extras]


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Wheelhouse:
    cache = wheel_cache()
    root = tmp_path_factory.mktemp("install")
    # From what the Dockerfile copies, nothing else, so that the image's wheel is the one
    # tested; offline, the build backend from the cache too.
    source = root / "source"
    source.mkdir()
    for name in IMAGE_SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(
                REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    pip(
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--find-links",
        str(cache),
        "--wheel-dir",
        str(root / "dist"),
        str(source),
    )
    wheels = list((root / "dist").glob("sagaline-*.whl"))
    assert len(wheels) == 1, wheels
    return Wheelhouse(wheels[0], cache, root, {})


@pytest.fixture(scope="module")
def install_pg_url() -> Iterator[str]:
    """A database of this module's own: other tests count the sagas of the session's."""
    url = shared_postgres_url(f"sagaline_install_{uuid.uuid4().hex[:10]}")
    try:
        yield url
    finally:
        drop_database(url)


def user_env(home: Path, app_dir: Path, **settings: str) -> dict[str, str]:
    """What a user's shell holds: no variable of this test process, the app on PYTHONPATH."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(app_dir),
        "SAGALINE_HOME": str(home / ".sagaline"),
        "PYTHONUNBUFFERED": "1",
        **settings,
    }


class VenvWorker(WorkerProcess):
    """`<venv>/bin/celery -A <module> worker`, with exactly the environment it is given."""

    def __init__(
        self, venv: Path, app_module: str, env: Mapping[str, str], cwd: Path, workdir: Path
    ) -> None:
        super().__init__(app_module, cwd=cwd, workdir=workdir, concurrency=1)
        self.venv = venv
        self.env = {**env, "SAGALINE_READY_FILE": str(self.ready_file)}

    @property
    def argv(self) -> list[str]:
        plain = super().argv  # [sys.executable, "-m", "celery", "-A", module, "worker", ...]
        return [str(self.venv / "bin" / "celery"), *plain[3:]]


@dataclass
class Installed:
    venv: Path
    app_dir: Path  # the user's code: the only entry of PYTHONPATH
    run_dir: Path  # the working directory: empty
    home: Path


def install(wheelhouse: Wheelhouse, tmp_path: Path, extras: str) -> Installed:
    box = Installed(wheelhouse.venv(extras), tmp_path / "app", tmp_path / "run", tmp_path / "home")
    for folder in (box.app_dir, box.run_dir, box.home):
        folder.mkdir()
    (box.app_dir / "installcheck.py").write_text(textwrap.dedent(APP_MODULE))
    (box.app_dir / "installcheck_client.py").write_text(textwrap.dedent(CLIENT_SCRIPT))
    return box


def serve_one_saga(
    box: Installed, tmp_path: Path, while_running: Callable[[], None] | None = None, **settings: str
) -> dict[str, Any]:
    """A worker from the venv, a client from the venv: one saga to its end (then
    `while_running`, before the worker stops)."""
    settings.setdefault("INSTALLCHECK_QUEUE", f"sagaline-install-{uuid.uuid4().hex[:12]}")
    env = user_env(box.home, box.app_dir, **settings)
    worker = VenvWorker(box.venv, "installcheck", env, cwd=box.run_dir, workdir=tmp_path / "worker")
    try:
        worker.start()
        started = time.monotonic()
        proc = subprocess.run(
            [str(box.venv / "bin" / "python"), "-m", "installcheck_client", str(SAGA_TIMEOUT)],
            cwd=box.run_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=SAGA_TIMEOUT + 30,
            check=False,
        )
        assert proc.returncode == 0, (
            proc.stdout + proc.stderr + "\n--- worker log ---\n" + worker.log_tail()
        )
        outcome: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        outcome["seconds"] = time.monotonic() - started
        if while_running is not None:
            while_running()
    finally:
        worker.stop()
    assert not worker.group_pids()
    return outcome


def assert_completed_from_the_venv(outcome: dict[str, Any], box: Installed) -> None:
    assert outcome["status"] == "COMPLETED"
    assert outcome["result"]["confirmation"] == "o-1/res-o-1"
    # The steps ran in the worker, with the sagaline installed in the venv.
    assert outcome["result"]["worker_pid"] != outcome["client_pid"]
    assert Path(outcome["sagaline"]).is_relative_to(box.venv)
    assert not Path(outcome["sagaline"]).is_relative_to(REPO_ROOT)


def delete_queue(url: str, queue: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=10) as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(queue)


def site_packages(box: Installed) -> Path:
    return next((box.venv / "lib").glob("python*/site-packages"))


def test_postgres_and_redis_extras_serve_a_saga_through_a_redis_broker(
    wheelhouse: Wheelhouse, tmp_path: Path, install_pg_url: str
) -> None:
    box = install(wheelhouse, tmp_path, "postgres,redis")  # the README's and the Dockerfile's
    with PrivateRedis() as redis:
        outcome = serve_one_saga(
            box, tmp_path, CELERY_BROKER_URL=redis.url, SAGALINE_STORE_URL=install_pg_url
        )
    assert_completed_from_the_venv(outcome, box)


def test_postgres_extra_serves_a_saga_through_rabbitmq_with_no_broker_extra(
    wheelhouse: Wheelhouse, tmp_path: Path, install_pg_url: str
) -> None:
    box = install(wheelhouse, tmp_path, "postgres")
    queue = f"sagaline-install-{uuid.uuid4().hex[:12]}"
    try:
        outcome = serve_one_saga(
            box,
            tmp_path,
            CELERY_BROKER_URL=RABBITMQ_URL,
            SAGALINE_STORE_URL=install_pg_url,
            INSTALLCHECK_QUEUE=queue,
        )
    finally:
        delete_queue(RABBITMQ_URL, queue)
    assert_completed_from_the_venv(outcome, box)
    # Nothing of the redis extra came along: RabbitMQ needs only kombu's own py-amqp.
    assert not (site_packages(box) / "redis").exists()


def sagaline_cli(box: Installed, *args: str, **settings: str) -> str:
    proc = subprocess.run(
        [str(box.venv / "bin" / "sagaline"), *args],
        cwd=box.run_dir,
        env=user_env(box.home, box.app_dir, **settings),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# The extras below are store drivers only: a worker adds nothing to what the combinations
# above prove, so the installed CLI migrates and reads the store, a real server each.


# Runs every Lua script of the Redis store (create, claim, transact's read and write)
# from the installed package: the scripts are package data, not Python strings.
REDIS_SCRIPTS_CHECK = """
import sys
from dataclasses import replace
from sagaline.records import Decision, Event, SagaRecord, SagaState, StepRecord
from sagaline.states import EventKind, Phase, SagaStatus, StepStatus
from sagaline.stores.redis import RedisStore

store = RedisStore(sys.argv[1])
saga = SagaRecord("wheel-1", "wheel", SagaStatus.RUNNING, {}, "fp", 1.0, 1.0)
step = StepRecord("wheel-1", "a", 0, status=StepStatus.DISPATCHED, attempt=1)
_, created = store.create_saga(SagaState(saga, {"a": step}),
                               [Event("wheel-1", EventKind.SAGA_STARTED, 1.0)])
claimed = store.claim_step("wheel-1", "a", Phase.FORWARD, 1, lease_until=9.0, now=2.0)

def decide(state):
    done = replace(state.steps["a"], status=StepStatus.SUCCEEDED, lease_until=None,
                   due_at=None)
    return Decision(steps=[done], step_versions={"a": state.steps["a"].version},
                    events=[Event("wheel-1", EventKind.STEP_SUCCEEDED, 3.0, "a", 1,
                                  "forward")])

store.transact("wheel-1", decide)
state = store.read_state("wheel-1")
print(created, claimed, state.steps["a"].status,
      " ".join(e.kind for e in store.history("wheel-1")))
"""


def test_redis_extra_alone_runs_the_redis_store(wheelhouse: Wheelhouse, tmp_path: Path) -> None:
    box = install(wheelhouse, tmp_path, "redis")
    with PrivateRedis() as redis:
        store = redis.url
        sagaline_cli(box, "db", "upgrade", SAGALINE_STORE_URL=store)
        assert sagaline_cli(box, "ls", "--json", SAGALINE_STORE_URL=store) == ""
        proc = subprocess.run(
            [str(box.venv / "bin" / "python"), "-c", REDIS_SCRIPTS_CHECK, store],
            cwd=box.run_dir,
            env=user_env(box.home, box.app_dir),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [
        "True",
        "True",
        "SUCCEEDED",
        "saga_started",
        "step_started",
        "step_succeeded",
    ]
    scripts = site_packages(box) / "sagaline" / "stores" / "redis_lua"
    # Every script of the source tree is in the wheel (and nothing else).
    source = REPO_ROOT / "sagaline" / "stores" / "redis_lua"
    shipped = sorted(p.name for p in scripts.glob("*.lua"))
    assert shipped == sorted(p.name for p in source.glob("*.lua"))
    assert {"cas_step.lua", "read_state.lua", "snapshot.lua", "write.lua"} <= set(shipped)
    assert not (site_packages(box) / "psycopg").exists()


def test_web_extra_serves_the_dashboard_and_the_api_from_its_own_files(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    box = install(wheelhouse, tmp_path, "web")
    sagaline_cli(box, "db", "upgrade")
    static = site_packages(box) / "sagaline" / "web" / "static"
    assert sum(f.stat().st_size for f in static.iterdir()) <= 150_000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(box.venv / "bin" / "sagaline"), "web", "--port", str(port)],
        cwd=box.run_dir,
        env=user_env(box.home, box.app_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: _answers(f"{base}/healthz"),
            timeout=60,
            interval=0.2,
            what="the installed sagaline web",
        )
        with urllib.request.urlopen(f"{base}/", timeout=10) as r:
            assert "<h1>Sagas</h1>" in r.read().decode()
        for path in ("/static/app.js", "/static/style.css", "/api/v1/openapi.json"):
            with urllib.request.urlopen(base + path, timeout=10) as r:
                assert r.status == 200, path
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        assert server.stderr is not None
        server.stderr.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def mariadb_tables(url: str) -> str:
    import pymysql

    conn = pymysql.connect(
        host="127.0.0.1", port=3306, user="root", connect_timeout=10, database=url.rsplit("/", 1)[1]
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW TABLES")
            return " ".join(str(row[0]) for row in cur.fetchall())
    finally:
        conn.close()


def test_mysql_extra_alone_runs_the_mariadb_store(wheelhouse: Wheelhouse, tmp_path: Path) -> None:
    box = install(wheelhouse, tmp_path, "mysql")
    store = create_mariadb_database()
    try:
        assert "sagaline_" not in mariadb_tables(store)
        sagaline_cli(box, "db", "upgrade", SAGALINE_STORE_URL=store)
        assert all(
            t in mariadb_tables(store).split()
            for t in ("sagaline_sagas", "sagaline_steps", "sagaline_events")
        )
        assert sagaline_cli(box, "ls", "--json", SAGALINE_STORE_URL=store) == ""
    finally:
        drop_mariadb_database(store)


def test_bare_install_serves_a_saga_on_the_embedded_defaults(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    box = install(wheelhouse, tmp_path, "")
    outcome = serve_one_saga(box, tmp_path)
    assert_completed_from_the_venv(outcome, box)
    # State and messages went to SAGALINE_HOME, not to the working directory.
    assert (box.home / ".sagaline" / "state.db").is_file()
    assert (box.home / ".sagaline" / "broker").is_dir()
    assert list(box.run_dir.iterdir()) == []
    assert not [
        d for d in ("psycopg", "pymysql", "redis", "fastapi") if (site_packages(box) / d).exists()
    ]
    # The CLI works without the web extra, and its `web` command names the extra.
    proc = subprocess.run(
        [str(box.venv / "bin" / "sagaline"), "web"],
        cwd=box.run_dir,
        env=user_env(box.home, box.app_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "pip install 'sagaline[web]'" in proc.stderr


def test_prometheus_extra_alone_serves_metrics_from_the_worker(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    import urllib.request

    from sagaline.testing import free_port

    box = install(wheelhouse, tmp_path, "prometheus")
    port = free_port()
    scraped: list[str] = []

    def scrape() -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            scraped.append(response.read().decode())

    outcome = serve_one_saga(box, tmp_path, scrape, SAGALINE_METRICS_PORT=str(port))
    assert_completed_from_the_venv(outcome, box)
    (text,) = scraped
    assert 'sagaline_sagas_finished_total{saga="installcheck",status="completed"} 1.0' in text
    assert 'sagaline_sagas_in_progress{saga="installcheck",status="running"}' in text
    assert not [d for d in ("psycopg", "pymysql", "redis") if (site_packages(box) / d).exists()]


def test_a_metrics_port_without_the_prometheus_extra_is_refused_naming_the_extra(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    box = install(wheelhouse, tmp_path, "")
    env = user_env(box.home, box.app_dir, SAGALINE_METRICS_PORT="9540", INSTALLCHECK_QUEUE="unused")
    proc = subprocess.run(
        [str(box.venv / "bin" / "python"), "-c", "import installcheck"],
        cwd=box.run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("pip install 'sagaline[prometheus]'")


def test_a_redis_broker_without_the_redis_extra_is_refused_naming_the_extra(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    box = install(wheelhouse, tmp_path, "")
    env = user_env(
        box.home,
        box.app_dir,
        CELERY_BROKER_URL="redis://127.0.0.1:9/0",
        INSTALLCHECK_QUEUE="unused",
    )
    proc = subprocess.run(
        [str(box.venv / "bin" / "python"), "-c", "import installcheck"],
        cwd=box.run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("sagaline.exceptions.ConfigurationError: the redis:// broker needs ")
    assert error.endswith(", which is not installed: pip install 'sagaline[redis]'")


def test_tracing_without_the_otel_extra_is_refused_naming_the_extra(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    box = install(wheelhouse, tmp_path, "")
    env = user_env(box.home, box.app_dir, SAGALINE_TRACING="otlp", INSTALLCHECK_QUEUE="unused")
    proc = subprocess.run(
        [str(box.venv / "bin" / "python"), "-c", "import installcheck"],
        cwd=box.run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "sagaline.exceptions.ConfigurationError: tracing needs OpenTelemetry ("
    ), error
    assert error.endswith("pip install 'sagaline[otel]'"), error


def test_otel_extra_alone_exports_a_saga_trace_over_otlp_http(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    box = install(wheelhouse, tmp_path, "otel")
    with serve_otlp() as receiver:
        outcome = serve_one_saga(
            box,
            tmp_path,
            SAGALINE_TRACING="otlp",
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.url,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        assert_completed_from_the_venv(outcome, box)
        # The worker exported on its way out (serve_one_saga stops it).
        receiver.wait_for(
            lambda: (
                {"saga installcheck", "step reserve", "step confirm"}
                <= {s.name for s in receiver.spans}
            ),
            timeout=30,
        )
    assert len({s.trace_id for s in receiver.spans}) == 1
    assert not [d for d in ("psycopg", "pymysql", "redis") if (site_packages(box) / d).exists()]


def test_the_installed_demo_runs_from_an_empty_directory(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    box = install(wheelhouse, tmp_path, "")
    env = {**user_env(box.home, box.run_dir), "COLUMNS": "200"}
    del env["PYTHONPATH"]
    try:
        proc = subprocess.run(
            [str(box.venv / "bin" / "sagaline"), "demo"],
            cwd=box.run_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        left = kill_left_worker(box.home / ".sagaline")
    assert not left, "the demo exited and left its worker running"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same demo as in a checkout: the same checks of its output.
    assert_demo_output(proc.stdout)
    assert list(box.run_dir.iterdir()) == []
    assert (box.home / ".sagaline" / "demo" / "state.db").is_file()


def test_testing_extra_alone_gives_pytest_the_plugin(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    """The README's test file, in an empty directory with no conftest: pytest finds the
    plugin through its entry point in the installed wheel."""
    import re

    box = install(wheelhouse, tmp_path, "testing")
    readme = (REPO_ROOT / "README.md").read_text()
    section = re.search(r"^## Testing your sagas\n(.*?)^## ", readme, re.S | re.M)
    assert section is not None
    code = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert code is not None
    (box.run_dir / "test_exploration.py").write_text(code.group(1))
    proc = subprocess.run(
        [
            str(box.venv / "bin" / "python"),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_exploration.py",
        ],
        cwd=box.run_dir,
        env=user_env(box.home, box.app_dir),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "5 passed" in proc.stdout
    assert not [d for d in ("psycopg", "pymysql", "redis") if (site_packages(box) / d).exists()]


def test_bench_peers_extra_alone_brings_what_the_peer_benchmark_imports(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    box = install(wheelhouse, tmp_path, "bench-peers")
    env = user_env(box.home, box.app_dir)
    python = str(box.venv / "bin" / "python")
    # The peers, and the stores and broker the benchmark runs them beside.
    imports = (
        "import dbos, celery_saga.backends.redis, psycopg, redis, kombu.transport.redis, "
        "sagaline.stores.redis; print(sagaline.stores.redis.__file__)"
    )
    proc = subprocess.run(
        [python, "-c", imports],
        cwd=box.run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(box.venv)
    # The benchmark is not in the wheel: a checkout runs it with the venv's interpreter.
    del env["PYTHONPATH"]
    proc = subprocess.run(
        [python, "-c", "from bench.peers import require_peers; require_peers(); print('peers ok')"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "peers ok"


OUTBOX_CHECK = """
import sys
import nats  # the NATS JetStream destination's client came with the extra
import redis
import sqlalchemy as sa
import sagaline
from sagaline.outbox.relay import Relay

store, stream_url = sys.argv[1], sys.argv[2]
engine = sa.create_engine(store)
with engine.begin() as conn:
    sagaline.outbox.publish(conn, "order.created", {"n": 1}, key="o-1", event_id="e-1")
relay = Relay(store, "order.*=" + stream_url + "?stream=orders")
print(relay.deliver_once())
relay.close()
print([f[b"id"].decode() for _, f in redis.Redis.from_url(stream_url).xrange("orders")])
"""


def test_outbox_extra_alone_relays_to_a_redis_stream(
    wheelhouse: Wheelhouse, tmp_path: Path
) -> None:
    box = install(wheelhouse, tmp_path, "outbox")
    store = f"sqlite:///{box.home}/state.db"
    sagaline_cli(box, "db", "upgrade", SAGALINE_STORE_URL=store)
    with PrivateRedis() as server:
        proc = subprocess.run(
            [str(box.venv / "bin" / "python"), "-c", OUTBOX_CHECK, store, server.url],
            cwd=box.run_dir,
            env=user_env(box.home, box.app_dir),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.split("\n")[:2] == ["1", "['e-1']"]
        assert "0 pending event(s)" in sagaline_cli(box, "outbox", "ls", SAGALINE_STORE_URL=store)
