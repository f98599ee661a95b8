"""H1's fixture: many finished sagas written straight into the store's tables, in bulk.

The rows have the shape sagaline writes (stores/schema.py): per saga 4 steps and
14 events (saga_started, 3 events per step, the final one), 90% COMPLETED,
9% COMPENSATED, 1% FAILED, created over the last 30 days. PostgreSQL fills them
with INSERT ... SELECT over generate_series; SQLite with INSERT ... SELECT over a
recursive counter, in one transaction; Redis with a Lua script that writes the
keys of the Redis store (stores/redis.py) for a few thousand sagas per call.
None of them goes through Python row by row.
"""

from __future__ import annotations

import time

HISTORY_NAME = "bench.history"
SPAN = 30 * 86400.0
EVENTS = [
    (1, "saga_started", None, None, None),
    *[
        (2 + 3 * (k - 1) + j, kind, f"s{k}", 1, "forward")
        for k in range(1, 5)
        for j, kind in enumerate(("step_dispatched", "step_started", "step_succeeded"))
    ],
    (14, "saga_completed", None, None, None),
]


def _status_sql(i: str) -> str:
    return (
        f"CASE WHEN {i} % 100 = 1 THEN 'FAILED' WHEN {i} % 11 = 0 THEN 'COMPENSATED' "
        f"ELSE 'COMPLETED' END"
    )


def _events_values() -> str:
    def lit(v: object) -> str:
        return "NULL" if v is None else (str(v) if isinstance(v, int) else f"'{v}'")

    return ", ".join(
        f"({n}, {lit(kind)}, {lit(step)}, {lit(att)}, {lit(ph)})"
        for n, kind, step, att, ph in EVENTS
    )


def load_postgres(url: str, n: int) -> dict[str, float]:
    """Insert `n` finished sagas; returns seconds spent loading and vacuuming."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
    t0 = time.time() - SPAN
    dt = SPAN / max(n, 1)
    # uuid-shaped ids that grow with i: the indexes fill in order, so the load is fast.
    sid = "lpad(to_hex(i), 8, '0') || '-0000-4000-8000-' || lpad(to_hex(i), 12, '0')"
    ended = f"CASE WHEN {_status_sql('i')} = 'COMPLETED' THEN FALSE ELSE TRUE END"
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(f"""
            INSERT INTO sagaline_sagas (saga_id, name, status, input, output, error, failed_step,
                idempotency_key, fingerprint, created_at, updated_at, finished_at, deadline,
                due_at, parent_saga_id, parent_step, version)
            SELECT {sid}, '{HISTORY_NAME}', {_status_sql("i")}, json_build_object('order', i),
                CASE WHEN {ended} THEN NULL ELSE json_build_object('order', i, 'ok', true) END,
                CASE WHEN {ended} THEN 'BenchFailure: step 4 fails on purpose' END,
                CASE WHEN {ended} THEN 's4' END,
                NULL, 'history', {t0} + i * {dt}, {t0} + i * {dt} + 0.05,
                {t0} + i * {dt} + 0.05, NULL, NULL, NULL, NULL, 12
            FROM generate_series(1, {int(n)}) AS i""")
        conn.execute(f"""
            INSERT INTO sagaline_steps (saga_id, name, position, status, attempt, comp_status,
                comp_attempt, output, compensation_data, has_compensation_data, error,
                comp_error, lease_until, due_at, started_at, finished_at, version)
            SELECT {sid}, 's' || k, k - 1,
                CASE WHEN k = 4 AND {ended} THEN 'FAILED' ELSE 'SUCCEEDED' END, 1,
                CASE WHEN k < 4 AND {ended} THEN 'COMPENSATED' END,
                CASE WHEN k < 4 AND {ended} THEN 1 ELSE 0 END,
                NULL, NULL, FALSE, NULL, NULL, NULL, NULL,
                {t0} + i * {dt} + k * 0.01, {t0} + i * {dt} + k * 0.01 + 0.005, 3
            FROM generate_series(1, {int(n)}) AS i CROSS JOIN generate_series(1, 4) AS k""")
        conn.execute(f"""
            INSERT INTO sagaline_events (saga_id, ts, kind, step, attempt, phase, detail)
            SELECT {sid}, {t0} + i * {dt} + e.n * 0.001, e.kind, e.step, e.attempt, e.phase, NULL
            FROM generate_series(1, {int(n)}) AS i
            CROSS JOIN (VALUES {_events_values()}) AS e(n, kind, step, attempt, phase)""")
        conn.commit()
    loaded = time.monotonic() - started
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Settle visibility maps and statistics now, not while a figure runs.
        for table in ("sagaline_sagas", "sagaline_steps", "sagaline_events"):
            conn.execute(f"VACUUM (ANALYZE) {table}")
    return {"load_seconds": loaded, "vacuum_seconds": time.monotonic() - started - loaded}


def load_sqlite(url: str, n: int) -> dict[str, float]:
    import sqlite3

    path = url.split(":///", 1)[1]
    t0 = time.time() - SPAN
    dt = SPAN / max(n, 1)
    sid = "printf('%08x-0000-4000-8000-%012x', i, i)"
    ended = f"({_status_sql('i')} <> 'COMPLETED')"
    counter = f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {int(n)})"
    started = time.monotonic()
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"""
            {counter}
            INSERT INTO sagaline_sagas (saga_id, name, status, input, output, error, failed_step,
                idempotency_key, fingerprint, created_at, updated_at, finished_at, deadline,
                due_at, parent_saga_id, parent_step, version)
            SELECT {sid}, '{HISTORY_NAME}', {_status_sql("i")}, json_object('order', i),
                CASE WHEN {ended} THEN NULL ELSE json_object('order', i, 'ok', json('true')) END,
                CASE WHEN {ended} THEN 'BenchFailure: step 4 fails on purpose' END,
                CASE WHEN {ended} THEN 's4' END,
                NULL, 'history', {t0} + i * {dt}, {t0} + i * {dt} + 0.05,
                {t0} + i * {dt} + 0.05, NULL, NULL, NULL, NULL, 12
            FROM c""")
        conn.execute(f"""
            {counter}, k(k) AS (VALUES (1), (2), (3), (4))
            INSERT INTO sagaline_steps (saga_id, name, position, status, attempt, comp_status,
                comp_attempt, output, compensation_data, has_compensation_data, error,
                comp_error, lease_until, due_at, started_at, finished_at, version)
            SELECT {sid}, 's' || k, k - 1,
                CASE WHEN k = 4 AND {ended} THEN 'FAILED' ELSE 'SUCCEEDED' END, 1,
                CASE WHEN k < 4 AND {ended} THEN 'COMPENSATED' END,
                CASE WHEN k < 4 AND {ended} THEN 1 ELSE 0 END,
                NULL, NULL, 0, NULL, NULL, NULL, NULL,
                {t0} + i * {dt} + k * 0.01, {t0} + i * {dt} + k * 0.01 + 0.005, 3
            FROM c CROSS JOIN k""")
        conn.execute(f"""
            {counter}, e(n, kind, step, attempt, phase) AS (VALUES {_events_values()})
            INSERT INTO sagaline_events (saga_id, ts, kind, step, attempt, phase, detail)
            SELECT {sid}, {t0} + i * {dt} + e.n * 0.001, e.kind, e.step, e.attempt, e.phase,
                NULL
            FROM c CROSS JOIN e""")
        conn.execute("COMMIT")
        loaded = time.monotonic() - started
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return {"load_seconds": loaded, "vacuum_seconds": time.monotonic() - started - loaded}


# The keys and JSON fields RedisStore writes for the same sagas (the key of each
# saga starts with its bucket's tag, `{prefix}:{bNN}`, computed by redis_layout.py
# and passed in ARGV[8]). Numbers are formatted here, never by cjson (it rounds to
# 14 digits). Each call writes sagas first..last; the sagas' created_at is t0 + i * dt.
_REDIS_LOAD = """
local name, tags = ARGV[2], cjson.decode(ARGV[8])
local first, last = tonumber(ARGV[3]), tonumber(ARGV[4])
local t0, dt = tonumber(ARGV[5]), tonumber(ARGV[6])
local function num(x) return string.format('%.6f', x) end
local function str(s) if s == nil then return 'null' end return '"' .. s .. '"' end
-- Each event's JSON around its timestamp, built once per call.
local ev_head, ev_tail, ev_offset = {}, {}, {}
for j, e in ipairs(cjson.decode(ARGV[7])) do
  local step, attempt, phase = 'null', 'null', 'null'
  if e[3] ~= cjson.null then step, attempt, phase = str(e[3]), tostring(e[4]), str(e[5]) end
  ev_head[j] = '{"kind": "' .. e[2] .. '", "ts": '
  ev_tail[j] = ', "step": ' .. step .. ', "attempt": ' .. attempt .. ', "phase": ' .. phase
    .. ', "detail": {}}'
  ev_offset[j] = e[1] * 0.001
end
local log = {}
for i = first, last do
  local sid = string.format('%08x-0000-4000-8000-%012x', i, i)
  local status = 'COMPLETED'
  if i % 100 == 1 then status = 'FAILED' elseif i % 11 == 0 then status = 'COMPENSATED' end
  local ended = status ~= 'COMPLETED'
  local c = t0 + i * dt
  local output, err, failed = '{"order": ' .. i .. ', "ok": true}', nil, nil
  if ended then output, err, failed = 'null', 'BenchFailure: step 4 fails on purpose', 's4' end
  local qsid = str(sid)
  local p = tags[i - first + 1]
  redis.call('HSET', p .. ':saga:' .. sid, 'saga_id', qsid, 'name', str(name),
    'status', str(status), 'input', '{"order": ' .. i .. '}', 'fingerprint', '"history"',
    'created_at', num(c), 'updated_at', num(c + 0.05), 'idempotency_key', 'null',
    'output', output, 'error', str(err), 'failed_step', str(failed),
    'finished_at', num(c + 0.05), 'deadline', 'null', 'due_at', 'null',
    'parent_saga_id', 'null', 'parent_step', 'null', 'input_fingerprint', 'null',
    'trace_context', 'null',
    'version', '12', 'txn', '8')
  for k = 1, 4 do
    local step_status, comp, comp_attempt = '"SUCCEEDED"', 'null', '0'
    if ended and k == 4 then step_status = '"FAILED"' end
    if ended and k < 4 then comp, comp_attempt = '"COMPENSATED"', '1' end
    redis.call('HSET', p .. ':step:' .. sid .. ':s' .. k, 'saga_id', qsid,
      'name', '"s' .. k .. '"', 'position', tostring(k - 1), 'status', step_status,
      'attempt', '1', 'comp_status', comp, 'comp_attempt', comp_attempt,
      'output', 'null', 'compensation_data', 'null', 'has_compensation_data', 'false',
      'error', 'null', 'comp_error', 'null', 'lease_until', 'null', 'due_at', 'null',
      'started_at', num(c + k * 0.01), 'finished_at', num(c + k * 0.01 + 0.005),
      'redispatches', '0', 'owner_node', 'null', 'owner_boot', 'null', 'owner_pid', 'null',
      'depends_on', k == 1 and '[]' or '["s' .. (k - 1) .. '"]', 'version', '3')
  end
  redis.call('ZADD', p .. ':steps:' .. sid, 0, 's1', 1, 's2', 2, 's3', 3, 's4')
  for j = 1, #ev_head do log[j] = ev_head[j] .. num(c + ev_offset[j]) .. ev_tail[j] end
  redis.call('RPUSH', p .. ':events:' .. sid, unpack(log))
  local score = num(c)
  redis.call('ZADD', p .. ':idx:created', score, sid)
  redis.call('ZADD', p .. ':idx:name:' .. name, score, sid)
  redis.call('ZADD', p .. ':idx:status:' .. status, score, sid)
  redis.call('ZADD', p .. ':idx:ns:' .. status .. ':' .. name, score, sid)
end
return last - first + 1
"""
REDIS_BATCH = 500  # sagas per script call: each call blocks the server for ~0.1 s


def load_redis(url: str, n: int, *, prefix: str = "sagaline") -> dict[str, float]:
    """Write `n` finished sagas with the Redis store's layout; returns seconds and bytes."""
    import json

    import redis

    from sagaline.stores.redis_migrate import read_layout

    t0 = time.time() - SPAN
    dt = SPAN / max(n, 1)
    events = json.dumps([list(e) for e in EVENTS])
    client = redis.Redis.from_url(url, socket_timeout=60, socket_connect_timeout=10)
    try:
        layout, _ = read_layout(client, prefix, None)  # the store's buckets (made if new)
        load = client.register_script(_REDIS_LOAD)
        before = int(client.info("memory")["used_memory"])
        started = time.monotonic()
        for first in range(1, n + 1, REDIS_BATCH):
            last = min(first + REDIS_BATCH - 1, n)
            tags = [layout.tag(layout.bucket_of(_bench_saga_id(i))) for i in range(first, last + 1)]
            load(
                args=[
                    prefix,
                    HISTORY_NAME,
                    first,
                    last,
                    repr(t0),
                    repr(dt),
                    events,
                    json.dumps(tags),
                ]
            )
        loaded = time.monotonic() - started
        used = int(client.info("memory")["used_memory"]) - before
    finally:
        client.close()
    return {"load_seconds": loaded, "vacuum_seconds": 0.0, "memory_bytes": float(used)}


def _bench_saga_id(i: int) -> str:
    """The id _REDIS_LOAD gives saga i."""
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def load_history(url: str, n: int) -> dict[str, float]:
    if n <= 0:
        return {"load_seconds": 0.0, "vacuum_seconds": 0.0}
    if url.startswith("sqlite"):
        return load_sqlite(url, n)
    if url.startswith("postgres"):
        return load_postgres(url, n)
    if url.startswith("redis"):
        return load_redis(url, n)
    raise ValueError(f"no bulk history loader for {url.split(':', 1)[0]} stores")
