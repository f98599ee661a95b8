-- `snapshot`, shared by read_state.lua and cas_step.lua (spliced in where a script
-- says `--@snapshot`): one consistent snapshot of a saga and its steps (in position
-- order) as one JSON array, [saga, step, ...], or '' when there is no saga. Every
-- hash value is JSON already, so the objects are joined as text: the client parses
-- one document instead of thousands of reply items and field values. A step the
-- caller holds at its current version (redis_cache.py) comes back as its name (a
-- JSON string), not as its object. Arguments: the saga's hash and step-name index,
-- the step-hash key prefix of the saga, and a JSON object of step name -> version
-- (as stored) of each step record the caller holds.
local function object(h)
  local parts = {}
  for i = 1, #h, 2 do parts[#parts + 1] = '"' .. h[i] .. '":' .. h[i + 1] end
  return '{' .. table.concat(parts, ',') .. '}'
end
local function snapshot(saga_key, steps_key, step_prefix, held_json)
  local saga = redis.call('HGETALL', saga_key)
  if #saga == 0 then return '' end
  local held = cjson.decode(held_json)
  local out = {object(saga)}
  for _, name in ipairs(redis.call('ZRANGE', steps_key, 0, -1)) do
    local key = step_prefix .. name
    local version = held[name]
    if version ~= nil and redis.call('HGET', key, 'version') == version then
      out[#out + 1] = cjson.encode(name)
    else
      local h = redis.call('HGETALL', key)
      if #h > 0 then out[#out + 1] = object(h) end
    end
  end
  return '[' .. table.concat(out, ',') .. ']'
end
