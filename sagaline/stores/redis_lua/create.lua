-- Create a saga: its hashes, indexes and first events, unless it exists. KEYS[1]: the
-- saga's hash (every key the payload names is in its bucket, the same hash slot).
-- Returns 1 when the saga exists now (a retried call whose first try did commit finds
-- its own saga), 0 when its id was aborted: it lost its idempotency key (redis_create.py).
local p = cjson.decode(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('EXISTS', p.aborted_key) == 1 then return 0 end
--@apply
return 1
