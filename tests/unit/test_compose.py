"""docker-compose.yml and the Dockerfile agree with what the code reads.

Docker is not available to the test suite, so the file is parsed and checked
here: services, healthchecks, and every variable against config.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

from sagaline.config import Settings
from sagaline.stores.registry import store_class

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# What the image builds sagaline from; tests/integration/test_install.py builds its
# wheel from exactly these, so the wheel it installs is the image's.
IMAGE_SOURCES = ("pyproject.toml", "README.md", "sagaline")
# Services that run sagaline code against the stack's broker and store.
SAGALINE_SERVICES = ("worker", "demo")
LONG_RUNNING = ("redis", "postgres", "worker", "flower")


def parse_block_yaml(text: str) -> Any:
    """The YAML subset docker-compose.yml keeps to (PyYAML is not a test dependency):
    block mappings and sequences, plain or quoted scalars, one-line JSON flow lists."""
    lines = []
    for raw in text.splitlines():
        stripped = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if stripped.strip():
            lines.append((len(stripped) - len(stripped.lstrip()), stripped.strip()))

    def scalar(value: str) -> Any:
        if value.startswith("["):
            return json.loads(value)
        if value[:1] in "\"'":
            return value[1:-1]
        return int(value) if value.isdigit() else value

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                items.append(scalar(lines[i][1][2:].strip()))
                i += 1
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            key, _, value = lines[i][1].partition(":")
            i += 1
            if value.strip():
                mapping[key.strip()] = scalar(value.strip())
            elif i < len(lines) and lines[i][0] > indent:
                mapping[key.strip()], i = block(i, lines[i][0])
            else:
                mapping[key.strip()] = None
        return mapping, i

    doc, end = block(0, lines[0][0])
    assert end == len(lines), f"unparsed line: {lines[end][1]!r}"
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = parse_block_yaml(COMPOSE.read_text())
    return doc


def test_the_subset_parser_reads_what_pyyaml_reads() -> None:
    assert parse_block_yaml(COMPOSE.read_text()) == yaml.safe_load(COMPOSE.read_text())


def test_the_stack_has_broker_store_worker_flower_and_demo(compose: dict[str, Any]) -> None:
    assert {"redis", "postgres", "worker", "flower", "demo"} <= set(compose["services"])


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        check = compose["services"][name].get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_every_sagaline_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = {f"SAGALINE_{f.name.upper()}" for f in fields(Settings)} | {
        "SAGALINE_HOME",
        "SAGALINE_WEB_TOKEN",
        "SAGALINE_WEB_READ_TOKEN",
    }
    used = {
        var
        for svc in compose["services"].values()
        for var in (svc.get("environment") or {})
        if var.startswith("SAGALINE_")
    }
    assert used, "compose sets no sagaline variable"
    assert used <= known, f"not read by sagaline.config: {sorted(used - known)}"


def test_worker_and_demo_reach_the_stacks_broker_and_store(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pg = services["postgres"]["environment"]
    for name in SAGALINE_SERVICES:
        svc = services[name]
        env = svc["environment"]
        broker, store = urlsplit(env["CELERY_BROKER_URL"]), urlsplit(env["SAGALINE_STORE_URL"])
        assert broker.scheme == "redis" and broker.hostname in services, name
        assert store.hostname in services and store.username == pg["POSTGRES_USER"], name
        assert store.password == pg["POSTGRES_PASSWORD"], name
        assert store.path.lstrip("/") == pg["POSTGRES_DB"], name
        assert store_class(env["SAGALINE_STORE_URL"]).__name__ == "SQLStore"
        for dependency in (broker.hostname, store.hostname):
            assert svc["depends_on"][dependency]["condition"] == "service_healthy", name
    flower = services["flower"]
    assert f"--broker={services['worker']['environment']['CELERY_BROKER_URL']}" in flower["command"]


def test_the_worker_runs_the_example_app_through_the_cli(compose: dict[str, Any]) -> None:
    command = compose["services"]["worker"]["command"]
    # The example ships inside the package: the image needs no checkout on PYTHONPATH.
    assert command[:4] == ["sagaline", "worker", "-A", "sagaline.demo.robots.app"]
    assert importlib.util.find_spec("sagaline.demo.robots.app") is not None
    # Its healthcheck is the liveness probe: no broker call, so an outage restarts nothing.
    assert compose["services"]["worker"]["healthcheck"]["test"][1:4] == [
        "sagaline",
        "health",
        "--liveness",
    ]
    # The example reads the same variable the stack sets.
    assert "CELERY_BROKER_URL" in (ROOT / "sagaline" / "demo" / "robots" / "app.py").read_text()
    assert compose["services"]["demo"]["command"] == ["sagaline", "demo"]


# What each URL scheme of the stack needs installed (README, "Install").
EXTRA_FOR_SCHEME = {"redis": "redis", "postgresql+psycopg": "postgres", "amqp": None}


def image_extras() -> set[str]:
    install = re.search(r'pip install "[^"\[]+\[([a-z,]+)\]"', DOCKERFILE.read_text())
    assert install is not None, "the Dockerfile installs sagaline with extras"
    return set(install.group(1).split(","))


def test_the_image_installs_the_extras_of_the_stacks_broker_and_store(
    compose: dict[str, Any],
) -> None:
    extras = image_extras()
    declared = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    assert extras <= declared
    for name in SAGALINE_SERVICES:
        env = compose["services"][name]["environment"]
        for url in (env["CELERY_BROKER_URL"], env["SAGALINE_STORE_URL"]):
            needed = EXTRA_FOR_SCHEME[urlsplit(url).scheme]
            assert needed is None or needed in extras, (name, url)


def test_the_image_runs_the_installed_package_not_a_source_tree() -> None:
    text = DOCKERFILE.read_text()
    assert "PYTHONPATH" not in text
    assert "COPY examples" not in text
    # The source it installed from is gone, so it cannot shadow the package.
    install = re.search(r'RUN pip install "([^"\[]+)\[', text)
    assert install is not None and f"rm -rf {install.group(1)}" in text


def test_the_image_builds_from_the_sources_the_install_test_builds_from() -> None:
    copied = [
        source
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]
    assert sorted(copied) == sorted(IMAGE_SOURCES)


def test_the_observability_profile_scrapes_the_workers_and_shows_the_dashboard(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    profile = {
        name for name, svc in services.items() if "observability" in (svc.get("profiles") or [])
    }
    assert profile == {"prometheus", "grafana", "jaeger"}
    for name in profile:
        for volume in services[name].get("volumes") or []:
            source = volume.split(":", 1)[0]
            assert (ROOT / source).exists(), (name, source)
    port = services["worker"]["environment"]["SAGALINE_METRICS_PORT"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["dns_sd_configs"][0] == {
        "names": ["worker"],
        "type": "A",
        "port": int(port),
        "refresh_interval": "15s",
    }
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
