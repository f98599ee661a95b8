"""The package's layering, read from the imports of every module (`ast`, no import run).

Every `import` counts, at module level and inside functions, except those under
`if TYPE_CHECKING:` (types only). Importing a submodule also runs its package's
`__init__`; those implicit edges are not counted (`sagaline/__init__.py` is the
public API and imports nearly everything).

The rules:
- no import cycle inside `sagaline`;
- the core (`states`, `records`, `exceptions`, `steps`, `definition`, `names`,
  `fingerprint`, `work`, `engine`, `attempts`, `compensation`, `recovery`,
  `undelivered`) imports from `sagaline` only the core and
  the leaves `payload` and `_state`: never the runtime (`runtime`, `execution`,
  `publishing`, `leases`, `signatures`, `children`, `handle`, `delivery`,
  `lost_claims`, `sweeper`, `celery_app`),
  `functional`, a store, `ops` or a surface. It imports no store driver and nothing
  of Celery or kombu, except that `steps` recognises a step's task through Celery's
  task types (`celery.app.task`, `celery.local`), which
  need no app, broker or I/O;
- `_state` (process-global state) imports only `exceptions` from `sagaline`; it
  may ask Celery for its current app;
- a store (`sagaline.stores.*`) imports from `sagaline` only `states`, `records`,
  `exceptions`, `payload`, `forking` (its locks) and other store modules, and nothing
  of Celery or kombu;
- the surfaces (`cli`, `cli_support`, `cli_outbox`, `timeline`, `demo`) reach the core
  only through `ops`:
  besides `ops` they import only the data and errors it hands out (`records`,
  `states`, `exceptions`), the settings (`config`), `celery_app` (the CLI sets an
  app up with `init_app`, as users do), `observability.health` (the probes that
  `sagaline health` runs), `testing` (the worker launcher the demo
  starts its worker with, as the tests and the benchmark do) and each other. The
  demo's saga app
  (`demo.robots`) is written as a user would, against the public API (`sagaline`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import sagaline

PACKAGE_DIR = Path(sagaline.__file__).resolve().parent

CORE = {
    "states",
    "records",
    "exceptions",
    "steps",
    "definition",
    "work",
    "engine",
    "compensation",
    "attempts",
    "undelivered",
    "fingerprint",
    "names",
    "recovery",
}
CORE_MAY_IMPORT = CORE | {"payload", "_state"}
STORE_MAY_IMPORT = {"states", "records", "exceptions", "payload", "forking"}
SURFACES = ("cli", "cli_support", "cli_outbox", "cli_gc", "timeline", "demo", "web")
SURFACE_MAY_IMPORT = {
    "ops",
    "records",
    "states",
    "exceptions",
    "config",
    "celery_app",
    "testing",
    "observability.health",
}
CELERY = ("celery", "kombu", "billiard")
STORE_DRIVERS = ("sqlalchemy", "alembic", "redis", "psycopg", "pymysql")
STEP_CELERY_TYPES = {"celery.app.task", "celery.local"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import among `nodes`, in functions too, skipping `if TYPE_CHECKING:` bodies."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _import_nodes(node.orelse)
        else:
            yield from _import_nodes(ast.iter_child_nodes(node))


def imports_of(module: str) -> set[str]:
    """The absolute names `module` imports: a submodule when a name is one, else the module."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes([ast.parse(path.read_text(), str(path))]):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            found.add(sub if sub in MODULES else base)
    return found


GRAPH = {m: {i for i in imports_of(m) if i in MODULES} for m in MODULES}


def _short(module: str) -> str:
    return module.removeprefix("sagaline.")


def _within(module: str, names: set[str] | tuple[str, ...]) -> bool:
    short = _short(module)
    return any(short == n or short.startswith(n + ".") for n in names)


def _third_party(module: str, roots: tuple[str, ...]) -> set[str]:
    return {i for i in imports_of(module) if i.split(".")[0] in roots}


def test_the_parser_sees_imports_inside_functions_and_skips_type_checking_ones() -> None:
    assert "sagaline.demo.runner" in GRAPH["sagaline.cli"]  # imported inside a command
    assert "sagaline.runtime" not in GRAPH["sagaline._state"]  # only under TYPE_CHECKING
    assert "sagaline.execution" in GRAPH["sagaline.runtime"]


def test_there_is_no_import_cycle_inside_the_package() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(map(_short, cycle)))
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_the_core_imports_neither_the_runtime_nor_a_store_nor_celery_nor_a_surface() -> None:
    for module in sorted(f"sagaline.{m}" for m in CORE):
        outside = {_short(i) for i in GRAPH[module] if not _within(i, CORE_MAY_IMPORT)}
        assert not outside, f"{_short(module)} imports {sorted(outside)}"
        allowed = STEP_CELERY_TYPES if module == "sagaline.steps" else set()
        foreign = _third_party(module, CELERY + STORE_DRIVERS) - allowed
        assert not foreign, f"{_short(module)} imports {sorted(foreign)}"


def test_process_global_state_is_a_leaf() -> None:
    assert {_short(i) for i in GRAPH["sagaline._state"]} <= {"exceptions"}


def test_the_fork_locks_are_a_leaf() -> None:
    # Stores and the core make their locks with it (forking.child_safe_lock).
    assert GRAPH["sagaline.forking"] == set()


def test_stores_import_only_leaf_modules() -> None:
    stores = [m for m in GRAPH if _within(m, ("stores",))]
    assert "sagaline.stores.sql" in stores
    for module in stores:
        outside = {
            _short(i) for i in GRAPH[module] if not _within(i, STORE_MAY_IMPORT | {"stores"})
        }
        assert not outside, f"{_short(module)} imports {sorted(outside)}"
        assert not _third_party(module, CELERY), f"{_short(module)} imports Celery"


def test_surfaces_reach_the_core_only_through_ops() -> None:
    surfaces = [m for m in GRAPH if _within(m, SURFACES)]
    assert "sagaline.demo.runner" in surfaces
    for module in surfaces:
        allowed = SURFACE_MAY_IMPORT | set(SURFACES)
        outside = {_short(i) for i in GRAPH[module] if not _within(i, allowed)}
        if _within(module, ("demo.robots",)):
            outside.discard("sagaline")  # the public API, as any application uses it
        assert not outside, f"{_short(module)} imports {sorted(outside)}"


def test_no_module_is_over_400_lines() -> None:
    long = {
        _short(m): n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"split these modules along their seams: {long}"


def test_only_the_tracing_module_imports_opentelemetry() -> None:
    # The `otel` extra is optional: the rest of the package must import without it
    # (the runtime imports observability.tracing inside a function, when tracing is on).
    otel_modules = {
        "observability.tracing",
        "observability.trace_context",
        "observability.provider",
    }
    importers = {_short(m) for m in GRAPH if _third_party(m, ("opentelemetry",))}
    assert importers == otel_modules
    eager = {
        _short(m)
        for m in GRAPH
        if _short(m) not in otel_modules
        and {f"sagaline.{o}" for o in otel_modules} & _module_level_imports(m)
    }
    assert not eager, f"{sorted(eager)} import OpenTelemetry's modules at module level"


def _module_level_imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" for a in node.names)
            found.add(base)
    return found
