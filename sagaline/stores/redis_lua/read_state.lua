-- One consistent snapshot of a saga and its steps (in position order) in one round trip,
-- as one JSON array: [saga, step, ...], or '' when there is no saga. Every hash
-- value is JSON already, so the objects are joined as text: the client parses one
-- document instead of thousands of reply items and field values. A step the caller
-- holds at its current version (redis_cache.py) comes back as its name (a JSON
-- string), not as its object.
-- KEYS: saga hash, step-name index. ARGV: the step-hash key prefix of this saga,
-- then step name and version (as stored) of each step record the caller holds.
local function object(h)
  local parts = {}
  for i = 1, #h, 2 do parts[#parts + 1] = '"' .. h[i] .. '":' .. h[i + 1] end
  return '{' .. table.concat(parts, ',') .. '}'
end
local saga = redis.call('HGETALL', KEYS[1])
if #saga == 0 then return '' end
local held = {}
for i = 2, #ARGV, 2 do held[ARGV[i]] = ARGV[i + 1] end
local out = {object(saga)}
for _, name in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local key = ARGV[1] .. name
  local version = held[name]
  if version ~= nil and redis.call('HGET', key, 'version') == version then
    out[#out + 1] = cjson.encode(name)
  else
    local h = redis.call('HGETALL', key)
    if #h > 0 then out[#out + 1] = object(h) end
  end
end
return '[' .. table.concat(out, ',') .. ']'
