"""The Lua scripts of the Redis store, read from the package's `redis_lua/*.lua` files.

Every write is one script, so it is atomic. A Redis script is not rolled back when
a command in it fails, so every script does all of its checks before its first
write (see redis_layout.py for the keys they touch). Each touches the keys of one
bucket, one hash slot of a Redis Cluster, and gets one of them as KEYS[1], which
routes it there. What several scripts share is in a file of its own, spliced in
where a script names it: `--@apply` (the writes of create.lua and write.lua),
`--@snapshot` (the read of read_state.lua and cas_step.lua).
"""

from __future__ import annotations

import re
from importlib import resources

_SPLICE = re.compile(r"^--@(\w+)\n", re.MULTILINE)


def _read(name: str) -> str:
    # importlib.resources: the files are package data, found in a wheel or a checkout.
    return (resources.files(__package__) / "redis_lua" / name).read_text(encoding="utf-8")


def load(name: str) -> str:
    """The source of script `name` (e.g. "write.lua"), with the files it names spliced in."""
    return _SPLICE.sub(lambda m: _read(f"{m.group(1)}.lua"), _read(name))


CREATE = load("create.lua")
WRITE = load("write.lua")
CAS_STEP = load("cas_step.lua")
READ_STATE = load("read_state.lua")
GC = load("gc.lua")
RELEASE_IDEM = load("release_idem.lua")
CHILDREN = load("children.lua")
IDEM = load("idem.lua")
ABORT = load("abort.lua")
