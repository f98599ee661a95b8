-- KEYS[1]: the saga's hash (every key the payload names is in its bucket).
-- Write one decision of `transact` (1), or nothing (0) unless no other transact
-- wrote the saga and every changed record still has the version the decision was
-- made on. A decision that only appends events checks only that the saga exists.
local p = cjson.decode(ARGV[1])
-- A saga deleted (retention) since it was read: write nothing, not even its events;
-- the caller reads again and finds no saga.
if redis.call('EXISTS', p.saga_key) == 0 then return 0 end
if p.txn and (redis.call('HGET', p.saga_key, 'txn') or '0') ~= p.txn then return 0 end
for _, c in ipairs(p.expect) do
  if redis.call('HGET', c[1], 'version') ~= c[2] then return 0 end
end
if p.txn then redis.call('HINCRBY', p.saga_key, 'txn', 1) end
--@apply
-- The saga as written, then its id: a listener waiting for it needs no read.
if p.ended then redis.call('PUBLISH', p.ended[1], p.ended[2]) end
if p.finished then redis.call('PUBLISH', p.finished[1], p.finished[2]) end
return 1
