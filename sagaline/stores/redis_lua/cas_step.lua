-- A compare-and-set on one step: claim (DISPATCHED -> RUNNING) or lease renewal
-- (RUNNING -> RUNNING). KEYS: step hash, due index, events, and for a claim by a
-- worker process the claims index of its node. ARGV: status field,
-- expected status, attempt field, expected attempt, new status, lease (JSON),
-- lease (score), due member, event ('' for none), then extra field/value pairs.
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
