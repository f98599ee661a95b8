-- Create a saga: its hashes, indexes and first events, unless it exists.
-- Returns the id of the saga that owns the idempotency key (or the id being created).
-- A retried call whose first try did commit finds its own saga and reports it as created.
local p = cjson.decode(ARGV[1])
if redis.call('EXISTS', p.saga_key) == 1 then return p.saga_id end
if p.idem_key and not redis.call('SET', p.idem_key, p.saga_id, 'NX') then
  return redis.call('GET', p.idem_key)
end
--@apply
return p.saga_id
