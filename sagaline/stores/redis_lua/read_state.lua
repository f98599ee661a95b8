-- One consistent snapshot of a saga and its steps (in position order) in one round trip,
-- as one JSON array of objects: [saga, step, ...], or '' when there is no saga. Every
-- hash value is JSON already, so the objects are joined as text: the client parses
-- one document instead of thousands of reply items and field values.
-- KEYS: saga hash, step-name index. ARGV: the step-hash key prefix of this saga.
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
