-- One consistent snapshot of a saga and its steps (in position order) in one round trip.
-- KEYS: saga hash, step-name index. ARGV: the step-hash key prefix of this saga.
local out = {redis.call('HGETALL', KEYS[1])}
if #out[1] == 0 then return {} end
for _, name in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. name)
end
return out
