-- Retention (redis_gc.py): free the idempotency keys of deleted sagas. KEYS: keys of
-- one bucket (one hash slot); ARGV: the id of the deleted saga each one named. A key
-- goes only if it still names that saga: a new saga may have taken it meanwhile
-- (redis_create.py). Returns how many keys went.
local n = 0
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[i] then
    redis.call('DEL', k)
    n = n + 1
  end
end
return n
