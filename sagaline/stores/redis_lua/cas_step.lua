-- A compare-and-set on one step: claim (DISPATCHED -> RUNNING) or lease renewal
-- (RUNNING -> RUNNING). KEYS: step hash, due index, events, saga hash, step-name
-- index, and for a claim by a worker process the claims index of its node. ARGV:
-- status field, expected status, attempt field, expected attempt, new status, lease
-- (JSON), lease (score), due member, event ('' for none), the other fields to set (a
-- JSON array of field, value...), then '' or, for a claim that reads the saga too,
-- the step-hash key prefix and the JSON of the step versions held (as read_state.lua).
-- Returns 0 (refused), 1 (done), or the saga's snapshot after the claim: the
-- completion then decides on it without reading again (redis.py).
--@snapshot
local k = KEYS[1]
if redis.call('HGET', k, ARGV[1]) ~= ARGV[2] or redis.call('HGET', k, ARGV[3]) ~= ARGV[4] then
  return 0
end
redis.call('HSET', k, ARGV[1], ARGV[5], 'lease_until', ARGV[6], 'due_at', ARGV[6],
           unpack(cjson.decode(ARGV[10])))
redis.call('HINCRBY', k, 'version', 1)
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[8])
if ARGV[9] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[9]) end
if KEYS[6] then redis.call('ZADD', KEYS[6], ARGV[7], ARGV[8]) end
if ARGV[11] == '' then return 1 end
return snapshot(KEYS[4], KEYS[5], ARGV[11], ARGV[12])
