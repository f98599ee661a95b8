"""The Lua scripts of the Redis store: every write is one script, so it is atomic.

A Redis script is not rolled back when a command in it fails, so every script
does all of its checks before its first write (see redis.py for the key layout).
"""

from __future__ import annotations

# The writes shared by create and transact. Scores and positions arrive as strings
# so that Lua never turns a float into a number (it would round timestamps).
APPLY = """
for _, h in ipairs(p.hset) do redis.call('HSET', h[1], unpack(h[2])) end
for _, z in ipairs(p.zrem) do redis.call('ZREM', z[1], z[2]) end
for _, z in ipairs(p.zadd) do redis.call('ZADD', z[1], z[2], z[3]) end
for _, e in ipairs(p.events) do redis.call('RPUSH', p.events_key, e) end
"""

# Returns the id of the saga that owns the idempotency key (or the id being created).
# A retried call whose first try did commit finds its own saga and reports it as created.
CREATE = """
local p = cjson.decode(ARGV[1])
if redis.call('EXISTS', p.saga_key) == 1 then return p.saga_id end
if p.idem_key and not redis.call('SET', p.idem_key, p.saga_id, 'NX') then
  return redis.call('GET', p.idem_key)
end
""" + APPLY + "return p.saga_id"

# No other transact wrote the saga, and every changed record still has the version
# the decision was made on. A decision that only appends events checks nothing.
WRITE = """
local p = cjson.decode(ARGV[1])
if p.txn and (redis.call('HGET', p.saga_key, 'txn') or '0') ~= p.txn then return 0 end
for _, c in ipairs(p.expect) do
  if redis.call('HGET', c[1], 'version') ~= c[2] then return 0 end
end
if p.txn then redis.call('HINCRBY', p.saga_key, 'txn', 1) end
""" + APPLY + """
if p.finished then redis.call('PUBLISH', p.finished[1], p.finished[2]) end
return 1"""

# A compare-and-set on one step: claim (DISPATCHED -> RUNNING) or lease renewal
# (RUNNING -> RUNNING). KEYS: step hash, due index, events, and for a claim by a
# worker process the claims index of its node. ARGV: status field,
# expected status, attempt field, expected attempt, new status, lease (JSON),
# lease (score), due member, event ('' for none), then extra field/value pairs.
CAS_STEP = """
local k = KEYS[1]
if redis.call('HGET', k, ARGV[1]) ~= ARGV[2] or redis.call('HGET', k, ARGV[3]) ~= ARGV[4] then
  return 0
end
redis.call('HSET', k, ARGV[1], ARGV[5], 'lease_until', ARGV[6], 'due_at', ARGV[6],
           unpack(ARGV, 10))
redis.call('HINCRBY', k, 'version', 1)
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[8])
if ARGV[9] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[9]) end
if KEYS[4] then redis.call('ZADD', KEYS[4], ARGV[7], ARGV[8]) end
return 1
"""

# One consistent snapshot of a saga and its steps (in position order) in one round trip,
# as one JSON array of objects: [saga, step, ...], or '' when there is no saga. Every
# hash value is JSON already, so the objects are joined as text: the client parses
# one document instead of thousands of reply items and field values.
# KEYS: saga hash, step-name index. ARGV: the step-hash key prefix of this saga.
READ_STATE = """
local function object(h)
  local parts = {}
  for i = 1, #h, 2 do parts[#parts + 1] = '"' .. h[i] .. '":' .. h[i + 1] end
  return '{' .. table.concat(parts, ',') .. '}'
end
local saga = redis.call('HGETALL', KEYS[1])
if #saga == 0 then return '' end
local out = {object(saga)}
for _, name in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local h = redis.call('HGETALL', ARGV[1] .. name)
  if #h > 0 then out[#out + 1] = object(h) end
end
return '[' .. table.concat(out, ',') .. ']'
"""
